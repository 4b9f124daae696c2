"""What a torch.distributed communicator says about itself."""

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")


def test_repr_names_only_devices_this_torch_build_has(tmp_path):
    from cupysyncbn.comm.torch import TorchCommunicator

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        comm = TorchCommunicator(None)
        text = repr(comm)
        assert text.startswith("<TorchCommunicator rank=0 size=1 devices=cpu")
        assert ("cuda" in text) == bool(torch.backends.cuda.is_built())
    finally:
        dist.destroy_process_group()
