"""Pushing adapters to the Hugging Face Hub.

``push`` refuses ``forget`` and ``negated`` adapters (:mod:`lora_unlearn.core.lineage`) unless the
caller passes ``allow_forget_adapter`` (the CLI's ``--allow-forget-adapter``): the safer way to
share a model without the knowledge is a merged model (``lora-unlearn export DIR OUT --merged``).
Safer, not safe: the factors are gone, but whoever holds the base can still compute
W_merged - W_base. Only the adapter's own files are uploaded, never anything else in the folder.
"""

from __future__ import annotations

from pathlib import Path

from ..core.adapter_io import load_adapter
from ..core.card import is_our_card, save_card
from ..core.lineage import RESTORE_WARNING, Kind, classify_folder
from ..errors import UserError

UPLOADED = ("adapter_config.json", "adapter_model.safetensors", "lora_unlearn.json", "README.md", "results.json",
            "scope.json", "scope.safetensors")  # a scope travels with its adapter (the card describes it)


def _unlearned_result(folder: Path) -> Path | None:
    """The recipe run's output next to a step folder (``RUN/steps/NAME`` -> ``RUN/adapter``), if any."""
    folder = Path(folder)
    if folder.parent.name == "steps" and (folder.parent.parent / "adapter" / "adapter_config.json").is_file():
        return folder.parent.parent / "adapter"
    return None


def refusal(kind: Kind, folder: str | Path) -> str:
    head = f"{folder} is a {kind.kind} adapter ({'; '.join(kind.reasons)}): {RESTORE_WARNING[kind.kind].replace('**', '')} "
    tail = "To push it anyway, pass --allow-forget-adapter."
    if kind.kind == "forget":
        # Merging F into the base would make the knowledge itself: never advise that.
        result = _unlearned_result(Path(folder))
        where = (f"the unlearned result, {result} (e.g. `lora-unlearn export {result} OUT --merged`, then upload OUT)"
                 if result else "the unlearned result (the recipe's output adapter, e.g. RUN/adapter), merged with "
                 "`lora-unlearn export RESULT OUT --merged`")
        return (head + "It holds the knowledge and must not be shared, as an adapter or merged into the base "
                f"(base + this adapter is the knowledge itself). Share {where}. " + tail)
    return (head + "To share the unlearned model without the knowledge, push a merged model instead "
            f"(`lora-unlearn export {folder} OUT --merged`, then upload OUT). " + tail)


def push(folder: str | Path, repo_id: str, *, private: bool = False, allow_forget_adapter: bool = False,
         token: str | None = None, endpoint: str | None = None, commit_message: str | None = None) -> str:
    """Validate, classify, refresh the card and upload an adapter folder to the Hub; return the commit URL.

    Refuses ``forget`` and ``negated`` adapters unless ``allow_forget_adapter``. Only the adapter's
    own files are uploaded (``UPLOADED``), never anything else in the folder.
    """
    folder = Path(folder)
    adapter = load_adapter(folder)
    kind = classify_folder(folder, adapter)
    if kind.carries_forget_knowledge and not allow_forget_adapter:
        raise UserError(refusal(kind, folder))
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
        if "/" not in repo_id:
            raise HFValidationError("expected OWNER/NAME")
    except HFValidationError as e:
        raise UserError(f"{repo_id!r} is not a Hub repository id ({str(e).splitlines()[0]}): use OWNER/NAME") from None
    if is_our_card(folder):
        save_card(folder, adapter, force=True)  # ours: checked just above
    api = HfApi(endpoint=endpoint, token=token)
    if api.token is None:
        from huggingface_hub import get_token

        if get_token() is None:
            raise UserError("no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again")
    return _upload(api, folder, repo_id, private, commit_message or f"Upload {folder.name} with lora-unlearn")


def _upload(api, folder: Path, repo_id: str, private: bool, message: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 allow_patterns=list(UPLOADED), commit_message=message)
    except HfHubHTTPError as e:
        raise UserError(f"the Hub refused the upload to {repo_id}: {str(e).splitlines()[0]} "
                        "(check the token's write access and the repository name)") from None
    except OSError as e:  # httpx.TransportError is not an OSError: caught below by name
        raise UserError(f"cannot reach the Hub at {api.endpoint}: {e}; check the network or HF_ENDPOINT") from None
    except Exception as e:
        if type(e).__module__.startswith(("httpx", "httpcore", "requests", "urllib3")):
            raise UserError(f"cannot reach the Hub at {api.endpoint} ({type(e).__name__}: {e}); "
                            "check the network or HF_ENDPOINT") from None
        raise
    return str(getattr(info, "commit_url", info))
