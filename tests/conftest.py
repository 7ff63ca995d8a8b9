import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from multigran.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny random anyres model + processor."""
    from multigran.tiny import build_tiny

    path = tmp_path_factory.mktemp("tiny_anyres")
    build_tiny(path, method="anyres", seed=0)
    return path


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; two threads on shared, busy cores spend their time waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
