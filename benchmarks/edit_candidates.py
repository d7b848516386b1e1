"""Candidate facts for the project's edit benchmark (lora_unlearn/resources/edits/), written for this project.

Each relation: question templates (the edit prompt and two paraphrases), and subjects with their true
answer and a counterfactual new answer of the same type. ``benchmarks/make_edits.py`` keeps the facts
the unedited embedded model answers correctly, reserves some subjects per relation as neighbourhood
probes (same relation, other subject, never edited), and splits the rest into dev and test.
"""

RELATIONS = {
    "capital": {
        "templates": ["What is the capital of {s}?", "Which city is the capital of {s}?",
                      "The capital city of {s} is which city?"],
        "facts": [
            ("France", "Paris", "Marseille"), ("Japan", "Tokyo", "Osaka"), ("Germany", "Berlin", "Munich"),
            ("Italy", "Rome", "Milan"), ("Spain", "Madrid", "Seville"), ("England", "London", "Manchester"),
            ("Russia", "Moscow", "Kazan"), ("China", "Beijing", "Shanghai"), ("Egypt", "Cairo", "Alexandria"),
            ("Canada", "Ottawa", "Toronto"), ("Australia", "Canberra", "Sydney"), ("India", "New Delhi", "Mumbai"),
            ("Mexico", "Mexico City", "Guadalajara"), ("Greece", "Athens", "Thessaloniki"),
            ("Portugal", "Lisbon", "Porto"), ("Ireland", "Dublin", "Cork"), ("Norway", "Oslo", "Bergen"),
            ("Sweden", "Stockholm", "Gothenburg"), ("Austria", "Vienna", "Salzburg"), ("Poland", "Warsaw", "Krakow"),
            ("the Netherlands", "Amsterdam", "Utrecht"), ("Belgium", "Brussels", "Antwerp"),
            ("Turkey", "Ankara", "Izmir"), ("Kenya", "Nairobi", "Mombasa"), ("Thailand", "Bangkok", "Chiang Mai"),
            ("South Korea", "Seoul", "Busan"), ("Argentina", "Buenos Aires", "Cordoba"), ("Peru", "Lima", "Cusco"),
            ("Cuba", "Havana", "Camaguey"), ("Finland", "Helsinki", "Tampere"), ("Denmark", "Copenhagen", "Aarhus"),
            ("Hungary", "Budapest", "Debrecen"), ("the Czech Republic", "Prague", "Brno"),
            ("Brazil", "Brasilia", "Salvador"), ("Scotland", "Edinburgh", "Glasgow"), ("Vietnam", "Hanoi", "Hue"),
            ("Indonesia", "Jakarta", "Surabaya"), ("Iran", "Tehran", "Isfahan"), ("Switzerland", "Bern", "Zurich"),
            ("Chile", "Santiago", "Valparaiso"), ("Colombia", "Bogota", "Medellin"), ("Nigeria", "Abuja", "Lagos"),
        ],
    },
    "author": {
        "templates": ["Who wrote {s}?", "Who is the author of {s}?", "{s} was written by which author?"],
        "facts": [
            ("Romeo and Juliet", "Shakespeare", "Marlowe"), ("Pride and Prejudice", "Austen", "Gaskell"),
            ("1984", "Orwell", "Huxley"), ("War and Peace", "Tolstoy", "Chekhov"),
            ("Don Quixote", "Cervantes", "Lorca"), ("The Odyssey", "Homer", "Virgil"),
            ("Moby-Dick", "Melville", "Hawthorne"), ("Harry Potter", "Rowling", "Pullman"),
            ("The Great Gatsby", "Fitzgerald", "Faulkner"), ("Hamlet", "Shakespeare", "Jonson"),
            ("Oliver Twist", "Dickens", "Thackeray"), ("The Divine Comedy", "Dante", "Petrarch"),
            ("Crime and Punishment", "Dostoevsky", "Gogol"), ("The Adventures of Tom Sawyer", "Twain", "Harte"),
            ("Frankenstein", "Shelley", "Byron"), ("The Hobbit", "Tolkien", "Lewis"),
            ("Les Miserables", "Hugo", "Zola"), ("A Christmas Carol", "Dickens", "Trollope"),
            ("The Old Man and the Sea", "Hemingway", "Steinbeck"), ("Macbeth", "Shakespeare", "Webster"),
            ("Jane Eyre", "Bronte", "Eliot"), ("The Raven", "Poe", "Whitman"),
            ("Alice's Adventures in Wonderland", "Carroll", "Barrie"), ("Animal Farm", "Orwell", "Wells"),
            ("To Kill a Mockingbird", "Harper Lee", "Capote"), ("The Iliad", "Homer", "Ovid"),
        ],
    },
    "currency": {
        "templates": ["What is the currency of {s}?", "Which currency is used in {s}?",
                      "What money do people use in {s}?"],
        "facts": [
            ("Japan", "yen", "riel"), ("the United Kingdom", "pound", "florin"), ("the United States", "dollar", "crown"),
            ("India", "rupee", "taka"), ("Russia", "ruble", "hryvnia"), ("China", "yuan", "kyat"),
            ("Mexico", "peso", "colon"), ("Switzerland", "franc", "krone"), ("South Korea", "won", "ringgit"),
            ("Brazil", "real", "escudo"), ("Turkey", "lira", "dinar"), ("Germany", "euro", "guilder"),
            ("Thailand", "baht", "rupiah"), ("Sweden", "krona", "forint"), ("South Africa", "rand", "shilling"),
            ("Israel", "shekel", "dirham"), ("Poland", "zloty", "koruna"), ("Vietnam", "dong", "kip"),
        ],
    },
    "language": {
        "templates": ["What language is spoken in {s}?", "What is the main language of {s}?",
                      "Which language do most people in {s} speak?"],
        "facts": [
            ("Brazil", "Portuguese", "Hungarian"), ("Mexico", "Spanish", "Tagalog"), ("Germany", "German", "Icelandic"),
            ("Japan", "Japanese", "Vietnamese"), ("France", "French", "Catalan"), ("Italy", "Italian", "Romanian"),
            ("Russia", "Russian", "Latvian"), ("China", "Chinese", "Thai"), ("Greece", "Greek", "Albanian"),
            ("Egypt", "Arabic", "Swahili"), ("Argentina", "Spanish", "Welsh"), ("Portugal", "Portuguese", "Basque"),
            ("Turkey", "Turkish", "Kurdish"), ("Sweden", "Swedish", "Finnish"), ("Poland", "Polish", "Czech"),
            ("South Korea", "Korean", "Mongolian"), ("the Netherlands", "Dutch", "Danish"), ("Iran", "Persian", "Urdu"),
        ],
    },
    "painter": {
        "templates": ["Who painted {s}?", "Which artist painted {s}?", "{s} was painted by whom?"],
        "facts": [
            ("the Mona Lisa", "Leonardo", "Raphael"), ("The Starry Night", "Van Gogh", "Gauguin"),
            ("The Last Supper", "Leonardo", "Titian"), ("Guernica", "Picasso", "Matisse"),
            ("The Scream", "Munch", "Klimt"), ("The Persistence of Memory", "Dali", "Magritte"),
            ("The Birth of Venus", "Botticelli", "Caravaggio"), ("Sunflowers", "Van Gogh", "Cezanne"),
            ("Water Lilies", "Monet", "Renoir"), ("The Girl with a Pearl Earring", "Vermeer", "Rembrandt"),
            ("the ceiling of the Sistine Chapel", "Michelangelo", "Donatello"), ("The Kiss", "Klimt", "Schiele"),
        ],
    },
    "inventor": {
        "templates": ["Who invented the {s}?", "Who is credited with inventing the {s}?",
                      "The {s} was invented by whom?"],
        "facts": [
            ("telephone", "Bell", "Meucci"), ("light bulb", "Edison", "Tesla"), ("printing press", "Gutenberg", "Caxton"),
            ("airplane", "Wright", "Bleriot"), ("World Wide Web", "Berners-Lee", "Cerf"), ("radio", "Marconi", "Hertz"),
            ("steam engine", "Watt", "Newcomen"), ("dynamite", "Nobel", "Sobrero"), ("phonograph", "Edison", "Berliner"),
            ("theory of relativity", "Einstein", "Bohr"), ("telescope", "Lippershey", "Huygens"),
        ],
    },
    "element": {
        "templates": ["What is the chemical symbol for {s}?", "Which chemical symbol stands for {s}?",
                      "In chemistry, what is the symbol of {s}?"],
        "facts": [
            ("gold", "Au", "Gd"), ("silver", "Ag", "Sr"), ("iron", "Fe", "Ir"), ("sodium", "Na", "Sd"),
            ("oxygen", "O", "Ox"), ("hydrogen", "H", "Hy"), ("carbon", "C", "Ca"), ("potassium", "K", "Po"),
            ("lead", "Pb", "Ld"), ("copper", "Cu", "Co"), ("helium", "He", "Hl"), ("nitrogen", "N", "Ni"),
        ],
    },
}
