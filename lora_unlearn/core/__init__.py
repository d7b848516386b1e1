"""What everything else stands on: adapters as tensors and folders, bases, data, answer probabilities.

    adapter      LoraModule / Adapter (dW = s * B @ A), PEFT config and keys, scale (c * dW)
    adapter_io   read, validate and write adapter folders (atomically, with lineage and card)
    lineage      what an adapter is (forget, negated, unlearning, knowledge), from its lineage
    card         the model card every written adapter carries
    fsutil       atomic folder writes, crash recovery, sha256, the pickle policy
    models       loading a base: the embedded default, a folder or a Hub id; nf4, int8 or full
    data         JSONL / datasets rows, chat-template encoding with answer-only labels
    stack        a base with frozen adapters at their scales, kept unmerged (PEFT)
    inference    greedy answers and answer-token probabilities, batched

Core imports no wing (docs/architecture.md; tests/test_architecture.py checks).
"""
