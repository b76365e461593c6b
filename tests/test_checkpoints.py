"""Loading the authors' checkpoints, parity fixtures, position-embedding resampling, transfer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from custom.checkpoints import (
    CheckpointError,
    convert_reference_state_dict,
    load_weights,
    read_state_dict,
    transfer_pretrained,
)
from custom.networks import TransUNet, decode_record, transunet_from_preset
from tests.helpers import REPO, SHARED

REFERENCE = SHARED / "reference"
needs_reference = pytest.mark.skipif(
    not REFERENCE.is_dir(), reason="../shared/reference (authors' fixtures) is not present in this clone"
)


def _model_from_fixture_config(c):
    return TransUNet(
        img_size=c["image_size"], out_channels=c["out_channels"], head=c["head"], hidden_size=c["hidden_size"],
        num_heads=c["num_heads"], mlp_dim=c["mlp_dim"], num_layers=c["num_layers"], cnn_units=c["resnet_units"],
        cnn_width=c["resnet_width"], decoder_channels=c["decoder_channels"], n_skip=c["n_skip"],
    )


@needs_reference
@pytest.mark.parametrize("name", ["parity_finetune_3class", "parity_pretrain"])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_parity_fixtures(name, prefix):
    d = torch.load(REFERENCE / f"{name}.pt", weights_only=True)
    model = _model_from_fixture_config(d["config"])
    sd = {prefix + k: v for k, v in d["state_dict"].items()}
    load_weights(model, {"state_dict": sd} if prefix else sd).eval()
    with torch.no_grad():
        out = model(d["input"])
    assert (out - d["output"]).abs().max().item() < 1e-4


@needs_reference
@pytest.mark.parametrize(
    "config,preset,classes",
    [("finetune_h192_1class", "retina", 1), ("finetune_h192_7class", "retina", 7),
     ("finetune_h768_1class", "vit_b", 1), ("pretrain_h768", "vit_b", 1), ("pretrain_h192", "retina", 1)],
)
def test_reference_key_layouts_map_onto_our_network(config, preset, classes):
    keys = json.loads((REFERENCE / "reference_keys.json").read_text())[config]
    fake = {k: torch.zeros(shape) for k, shape in keys.items()}
    ours = convert_reference_state_dict(fake)
    head = "reconstruction" if config.startswith("pretrain") else "segmentation"
    model_sd = transunet_from_preset(preset, out_channels=classes, head=head).state_dict()
    assert set(ours) == set(model_sd)
    assert all(tuple(ours[k].shape) == tuple(model_sd[k].shape) for k in ours if k != "_extra_state")
    assert decode_record(ours["_extra_state"])["head"] == head  # the converted weights say which head they hold


@needs_reference
def test_import_script_roundtrip(tmp_path):
    d = torch.load(REFERENCE / "parity_finetune_3class.pt", weights_only=True)
    src = tmp_path / "authors.pth"
    torch.save({"model": {"module." + k: v for k, v in d["state_dict"].items()}}, src)
    dst = tmp_path / "ours.pt"
    c = d["config"]
    # the fixture's sizes match no preset: an explicit preset is refused with a clear message
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "import_reference_checkpoint.py"), str(src), str(dst)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "matches no preset" in r.stderr
    model = _model_from_fixture_config(c)
    load_weights(model, read_state_dict(src)).eval()
    with torch.no_grad():
        assert (model(d["input"]) - d["output"]).abs().max() < 1e-4


def test_import_script_converts_released_width(tmp_path):
    model = transunet_from_preset("retina", img_size=224, out_channels=7)
    # fabricate an authors'-layout state dict by inverting our names through the converter's rules
    ours = model.state_dict()
    ref_keys = json.loads((REFERENCE / "reference_keys.json").read_text())["finetune_h192_7class"] if REFERENCE.is_dir() else None
    if ref_keys is None:
        pytest.skip("../shared/reference is not present")
    fake = {k: torch.randn(shape) if shape else torch.tensor(0) for k, shape in ref_keys.items()}
    src, dst = tmp_path / "authors.pth", tmp_path / "ours.pt"
    torch.save(fake, src)
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "import_reference_checkpoint.py"), str(src), str(dst)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    loaded = torch.load(dst, weights_only=True)
    assert set(loaded) == set(ours)
    conv = convert_reference_state_dict(fake)
    assert torch.equal(loaded["transformer.blocks.3.attn.to_q.weight"], conv["transformer.blocks.3.attn.to_q.weight"])


def test_position_embeddings_resampled_224_to_256():
    src = transunet_from_preset("tiny", img_size=224)
    dst = transunet_from_preset("tiny", img_size=256)
    load_weights(dst, src.state_dict()).eval()
    assert dst.embeddings.position_embeddings.shape == (1, 256, 32)
    with torch.no_grad():
        assert dst(torch.rand(1, 1, 256, 256)).shape == (1, 1, 256, 256)
    # a constant embedding stays constant after resampling
    with torch.no_grad():
        src.embeddings.position_embeddings.fill_(0.25)
    load_weights(dst, src.state_dict())
    assert torch.allclose(dst.embeddings.position_embeddings, torch.full((1, 256, 32), 0.25), atol=1e-5)


def test_mismatched_checkpoint_lists_keys(tmp_path):
    path = tmp_path / "three.pt"
    torch.save(transunet_from_preset("tiny", img_size=64, out_channels=3).state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        load_weights(transunet_from_preset("tiny", img_size=64, out_channels=2), path)
    assert "head.weight" in str(e.value) and "head.bias" in str(e.value) and str(path) in str(e.value)
    with pytest.raises(CheckpointError, match="mismatching keys"):
        load_weights(transunet_from_preset("retina", img_size=64), path)


def test_not_a_checkpoint_and_no_code_execution(tmp_path):
    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    import pickle

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="weights-only"):
        read_state_dict(evil)
    assert not (tmp_path / "pwned").exists()
    junk = tmp_path / "junk.pt"
    torch.save({"epoch": 3}, junk)
    with pytest.raises(CheckpointError, match="not a TransUNet checkpoint"):
        read_state_dict(junk)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pt")


@pytest.mark.parametrize("transfer,n_expected", [("encoder", None), ("transformer", None), ("none", 0)])
def test_transfer_modes_and_freezing(tmp_path, transfer, n_expected):
    torch.manual_seed(0)
    pre = transunet_from_preset("tiny", img_size=64, head="reconstruction")
    path = tmp_path / "pre.pt"
    torch.save(pre.state_dict(), path)
    torch.manual_seed(1)
    seg = transunet_from_preset("tiny", img_size=64, out_channels=3)
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    transfer_pretrained(seg, path if transfer != "none" else None, transfer=transfer, freeze="transformer")
    after, pre_sd = seg.state_dict(), pre.state_dict()
    assert decode_record(after.pop("_extra_state"))["head"] == "segmentation"  # the record is not transferred
    for k in after:
        copied = transfer == "encoder" and not k.startswith(("decoder.", "head.")) or (
            transfer == "transformer" and k.startswith("transformer."))
        if copied:
            assert torch.equal(after[k], pre_sd[k]), k
        else:
            assert torch.equal(after[k], before[k]), k
    frozen = {n for n, p in seg.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in seg.named_parameters() if n.startswith("transformer.")}
    # one optimisation step: frozen parameters stay, the others move
    opt = torch.optim.SGD([p for p in seg.parameters() if p.requires_grad], lr=0.1)
    snap = {n: p.detach().clone() for n, p in seg.named_parameters()}
    seg.train()
    seg(torch.rand(2, 1, 64, 64)).square().mean().backward()
    opt.step()
    for n, p in seg.named_parameters():
        assert torch.equal(p, snap[n]) == (n in frozen), n


def test_transfer_errors(tmp_path):
    seg = transunet_from_preset("tiny", img_size=64)
    with pytest.raises(CheckpointError, match="--transfer none"):
        transfer_pretrained(seg, tmp_path / "nope.pt")
    other = tmp_path / "other.pt"
    torch.save(transunet_from_preset("retina", img_size=64).state_dict(), other)
    with pytest.raises(CheckpointError, match="cannot transfer"):
        transfer_pretrained(seg, other)
    with pytest.raises(CheckpointError, match="transfer must be"):
        transfer_pretrained(seg, other, transfer="all")
