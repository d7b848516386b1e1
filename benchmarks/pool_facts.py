"""Short factual questions for the opt-in preservation pool ``preservation+facts``, written for this project.

The edit benchmark's neighbourhood probes (same relation, another subject) showed that KL on
instructions and everyday questions does not hold an edit back from the facts *next to* it: a
capital edit leaked into every capital question. These are the same kinds of question
(capitals, authors, currencies, languages, inventors, chemical symbols, painters) on subjects that
no evaluation set of the project uses (``benchmarks/make_edits.py --pool-only`` keeps only the ones
that pass ``check_pool`` against every evaluation set and the edit candidates, and answers them with
the embedded model, whose own answers are the KL's targets: they need not be right).
"""

TEMPLATES = {
    "capital": ["What is the capital of {s}?", "Which city is the capital of {s}?", "The capital city of {s} is which city?"],
    "currency": ["What is the currency of {s}?", "Which currency is used in {s}?", "What money do people use in {s}?"],
    "language": ["What language is spoken in {s}?", "What is the main language of {s}?",
                 "Which language do most people in {s} speak?"],
    "author": ["Who wrote {s}?", "Who is the author of {s}?", "{s} was written by which author?"],
    "painter": ["Who painted {s}?", "Which artist painted {s}?", "{s} was painted by whom?"],
    "inventor": ["Who invented the {s}?", "Who is credited with inventing the {s}?", "The {s} was invented by whom?"],
    "element": ["What is the chemical symbol for {s}?", "Which chemical symbol stands for {s}?",
                "In chemistry, what is the symbol of {s}?"],
}
COUNTRIES = ["Ukraine", "Romania", "New Zealand", "Saudi Arabia", "Venezuela", "Ethiopia", "Ghana", "Iceland",
             "Pakistan", "the Philippines", "Morocco", "Bulgaria", "Croatia", "Serbia", "Malaysia", "Bangladesh",
             "Nepal", "Iraq", "Algeria", "Jamaica", "Ecuador", "Uruguay", "Mongolia", "Luxembourg", "Lithuania",
             "Estonia", "Tanzania", "Uganda", "Bolivia", "Slovakia"]
SUBJECTS = {
    "capital": COUNTRIES,
    "currency": COUNTRIES[::2],
    "language": COUNTRIES[1::2],
    "author": ["Dracula", "Wuthering Heights", "Little Women", "Treasure Island", "Brave New World",
               "The Catcher in the Rye", "Madame Bovary", "Anna Karenina", "Great Expectations", "Gulliver's Travels",
               "Robinson Crusoe", "The Canterbury Tales", "Paradise Lost", "The Count of Monte Cristo",
               "The Three Musketeers", "The Jungle Book", "Peter Pan", "The Little Prince", "Lord of the Flies",
               "Fahrenheit 451", "Of Mice and Men", "The Grapes of Wrath", "The Time Machine", "Ulysses"],
    "painter": ["The Night Watch", "American Gothic", "The Creation of Adam", "Las Meninas",
                "The Garden of Earthly Delights", "Liberty Leading the People", "The Great Wave off Kanagawa",
                "The School of Athens", "Nighthawks", "The Arnolfini Portrait", "Impression, Sunrise",
                "The Hay Wain"],
    "inventor": ["cotton gin", "television", "lightning rod", "sewing machine", "telegraph", "jet engine",
                 "computer mouse", "microwave oven", "safety razor", "diesel engine", "hot air balloon",
                 "mercury thermometer", "electric battery", "revolver", "elevator brake", "bifocal glasses"],
    "element": ["calcium", "zinc", "sulfur", "uranium", "neon", "tin", "mercury", "chlorine", "magnesium",
                "aluminium", "platinum", "nickel", "silicon", "phosphorus", "iodine", "argon"],
}


def prompts(allowed=lambda text: True) -> list[str]:
    """One question per subject: the relation's question forms in turn, the next form where ``allowed``
    refuses one (the pool check rejects a form that shares a term with an evaluation set), none if all are."""
    out = []
    for rel, subjects in SUBJECTS.items():
        for i, s in enumerate(subjects):
            forms = TEMPLATES[rel][i % 3:] + TEMPLATES[rel][:i % 3]
            texts = [f.format(s=s) for f in forms]
            ok = [t[0].upper() + t[1:] for t in texts if allowed(t[0].upper() + t[1:])]
            out += ok[:1]
    return out
