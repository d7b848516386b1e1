"""Serving adapters: per-request forget strengths, loading with adapters, the OpenAI-style HTTP API.

    runtime      ForgetRuntime: K adapters on one base, a coefficient per adapter per batch row
    scope        scoped forgetting: the strength "auto", set per row by each adapter's scope detector
                 (the detector itself is lora_unlearn.core.scope, shared with the recipe runner)
    loading      load_model (unmerged exact, or merged and measured), hotswap
    app          create_app, serve, background (the FastAPI app and its error handlers)
    routes       the endpoints and the Service they share
    schemas      limits, errors, request parsing and response shapes
    batcher      the worker that decodes concurrent requests together (continuous batching)
    decoding     rows decoded a token at a time, joining and leaving between steps, each with its own
                 forget setting, sampling, stop strings, budget; text as it is generated
    streaming    answering a request in one body or as Server-Sent Events
    registry     adapters by name: NAME=DIR specs, Hub ids, card kinds

Serving imports core and arithmetic, never training, evaluate or hub.
"""
