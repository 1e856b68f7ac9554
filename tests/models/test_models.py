"""Registry, checkpoints (safetensors only) and batch inference, with tiny timm models."""

import json
import os

import numpy as np
import pytest
import torch

from engine.models import (CheckpointError, MissingWeights, Predictor, create_model, get_spec,
                           list_models, read_checkpoint, write_checkpoint)

CODES = ("L2", "MO2", "M6")


def _tiny(tmp_path, name="deepheme-tiny"):
    torch.manual_seed(0)
    model = create_model(name, allow_untrained=True, class_codes=CODES)
    card = {"name": name, "architecture": model.spec.architecture, "class_codes": list(CODES)}
    path = str(tmp_path / "model.safetensors")
    write_checkpoint(model.module.state_dict(), card, path)
    return model, path


def test_unknown_name_lists_registered_models():
    from engine.errors import ConfigError

    with pytest.raises(ConfigError) as info:  # a config's or flag's: said in a line, by job_main
        create_model("resnet-9000")
    for name in ("deepheme-resnext50", "dinov2-vits14", "dinov2-vitb14", "dinov2-vitl14"):
        assert name in str(info.value) and name in list_models()


def test_missing_weights_refuse_with_the_expected_checkpoint():
    with pytest.raises(MissingWeights, match="deepheme-resnet18.*no trained weights"):
        create_model("deepheme-resnet18")
    with pytest.raises(MissingWeights, match="--allow-untrained"):
        create_model("dinov2-vits14")


def test_save_load_gives_identical_outputs(tmp_path):
    model, path = _tiny(tmp_path)
    loaded = create_model("deepheme-tiny", path)
    assert loaded.class_codes == CODES and loaded.trained
    crops = np.random.default_rng(0).integers(0, 255, (4, 96, 96, 3), dtype=np.uint8)
    a = Predictor(model, "cpu").predict(crops)
    b = Predictor(loaded, "cpu").predict(crops)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 3) and np.allclose(a.sum(1), 1, atol=1e-5)


def test_an_untrained_model_seeded_repeats_without_touching_the_callers_random_state():
    crops = np.random.default_rng(2).integers(0, 255, (3, 96, 96, 3), dtype=np.uint8)

    def probs(**kw):
        return Predictor(create_model("deepheme-tiny", allow_untrained=True, class_codes=CODES,
                                      **kw), "cpu").predict(crops)

    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    a = probs(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's draws are its own
    torch.manual_seed(6)
    np.testing.assert_array_equal(a, probs(seed=0))  # in another process or run alike
    assert not np.allclose(probs(seed=1), a)
    assert not np.allclose(probs(), probs())  # unseeded: torch's global generator, as before


def test_a_checkpoint_is_loaded_without_drawing_the_weights_it_replaces(tmp_path):
    """A model with a checkpoint is built on the meta device and given the checkpoint's tensors
    (`engine.models.factory._loaded_module`): no random initialisation, whose draws moved
    torch's global generator and took 2.7 s of a ViT-L/14 on a CPU."""
    model, path = _tiny(tmp_path)
    torch.manual_seed(3)
    state = torch.random.get_rng_state()
    loaded = create_model("deepheme-tiny", path)
    assert torch.equal(torch.random.get_rng_state(), state)  # nothing drawn
    tensors = [*loaded.module.parameters(), *loaded.module.buffers()]
    assert not any(t.is_meta for t in tensors) and all(p.requires_grad
                                                       for p in loaded.module.parameters())
    for (k, a), b in zip(model.module.state_dict().items(), loaded.module.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_build_whose_buffers_no_checkpoint_holds_is_built_as_usual(tmp_path, monkeypatch):
    """A timm model with buffers left out of its state dict (CoAtNet's relative position
    indices) would keep them empty on the meta device: it is built and loaded as before."""
    from engine.models.registry import _REGISTRY, ModelSpec

    spec = ModelSpec("test-coatnet", "test_coatnet", task="classification", input_px=160,
                     input_mpp=0.25)
    monkeypatch.setitem(_REGISTRY, spec.name, spec)
    model, path = _tiny(tmp_path, spec.name)
    assert any(k not in model.module.state_dict() for k, _ in model.module.named_buffers())
    loaded = create_model(spec.name, path)
    assert not any(b.is_meta for b in loaded.module.buffers())
    x = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model.module(x), rtol=0, atol=0)


def test_fp16_checkpoint_loads_close(tmp_path):
    model, _ = _tiny(tmp_path)
    path = str(tmp_path / "half.safetensors")
    write_checkpoint(model.module.state_dict(), {"name": "deepheme-tiny", "architecture":
                                                 model.spec.architecture,
                                                 "class_codes": list(CODES)}, path,
                     dtype=torch.float16)
    crops = np.random.default_rng(1).integers(0, 255, (2, 96, 96, 3), dtype=np.uint8)
    a = Predictor(model, "cpu").predict(crops)
    b = Predictor(create_model("deepheme-tiny", path), "cpu").predict(crops)
    np.testing.assert_allclose(a, b, atol=2e-2)


@pytest.mark.parametrize("how", ["torch.save", "raw-pickle"])
def test_pickle_checkpoints_are_refused(tmp_path, how):
    model, _ = _tiny(tmp_path)
    path = tmp_path / "evil.safetensors"
    if how == "torch.save":
        torch.save(model.module.state_dict(), path)
    else:
        import pickle

        path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    (tmp_path / "evil.json").write_text(json.dumps({"architecture": "test_resnet"}))
    with pytest.raises(CheckpointError, match="never unpickles"):
        create_model("deepheme-tiny", str(path))


def test_checkpoint_needs_card_and_matching_architecture(tmp_path):
    _, path = _tiny(tmp_path)
    (tmp_path / "model.json").unlink()
    with pytest.raises(CheckpointError, match="card missing"):
        read_checkpoint(path)
    _, path = _tiny(tmp_path)
    with pytest.raises(CheckpointError, match="holds a 'test_resnet' model"):
        create_model("deepheme-resnet18", path)


def test_a_checkpoint_or_card_cut_short_is_refused_naming_it(tmp_path):
    """A checkpoint copied in part (a transfer that stopped) ended the job in safetensors'
    traceback, and a card cut short in a one-line refusal that named neither file."""
    _, path = _tiny(tmp_path)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    (tmp_path / "cut.json").write_text((tmp_path / "model.json").read_text())
    with pytest.raises(CheckpointError, match=f"{cut} is damaged or cut short .*: copy it"):
        read_checkpoint(str(cut))
    card = (tmp_path / "model.json").read_text()
    (tmp_path / "model.json").write_text(card[: len(card) // 2])
    with pytest.raises(CheckpointError, match=f"card {tmp_path}/model.json is not valid JSON"):
        read_checkpoint(path)
    (tmp_path / "model.json").write_text("[]")
    with pytest.raises(CheckpointError, match="holds a JSON list, not an object"):
        read_checkpoint(path)


def test_a_checkpoint_loads_only_into_the_build_it_was_trained_in(tmp_path):
    """The same ResNeXt-50 weights with a dilated last stage (output stride 16) compute
    something else: a checkpoint of one build is refused by the other, by name, except as a
    start to fine-tune from; the card of a model trained so records its build."""
    from engine.models import write_checkpoint

    torch.manual_seed(0)
    plain = create_model("deepheme-resnext50-os16", allow_untrained=True, class_codes=CODES)
    assert get_spec("deepheme-resnext50-os16").architecture == "resnext50_32x4d"
    path = str(tmp_path / "plain.safetensors")
    write_checkpoint(plain.module.state_dict(), {"name": "deepheme-resnext50", "architecture":
                                                 "resnext50_32x4d", "class_codes": CODES}, path)
    with pytest.raises(CheckpointError, match=r"built with \{\}.*'output_stride': 16.*"
                                              r"'deepheme-resnext50'"):
        create_model("deepheme-resnext50-os16", path)
    start = create_model("deepheme-resnext50-os16", path, any_build=True)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        assert start.module.forward_features(x).shape[-2:] == (6, 6)
        assert create_model("deepheme-resnext50", path).module.forward_features(x).shape[-2:] \
            == (3, 3)
    dilated = str(tmp_path / "os16.safetensors")
    write_checkpoint(plain.module.state_dict(), {
        "name": "deepheme-resnext50-os16", "architecture": "resnext50_32x4d",
        "timm_kwargs": {"output_stride": 16}, "class_codes": CODES}, dilated)
    assert create_model("deepheme-resnext50-os16", dilated).trained
    with pytest.raises(CheckpointError, match="'output_stride': 16"):
        create_model("deepheme-resnext50", dilated)


def test_tile_encoder_embeds_and_resizes():
    enc = create_model("dinov2-tiny", allow_untrained=True)
    assert not enc.trained
    tiles = np.random.default_rng(2).integers(0, 255, (3, 200, 200, 3), dtype=np.uint8)
    emb = Predictor(enc, "cpu").embed(tiles)  # resized to 224 inside
    assert emb.shape == (3, enc.num_features) and emb.dtype == np.float32
    with pytest.raises(ValueError, match="encoder"):
        Predictor(enc, "cpu").predict(tiles)


def test_tta_averages_dihedral_views():
    model = create_model("deepheme-tiny", allow_untrained=True, class_codes=CODES)
    crops = np.random.default_rng(3).integers(0, 255, (2, 96, 96, 3), dtype=np.uint8)
    p = Predictor(model, "cpu")
    rotated = np.ascontiguousarray(np.rot90(crops, 1, axes=(1, 2)))
    np.testing.assert_allclose(p.predict(crops, tta=True), p.predict(rotated, tta=True),
                               atol=1e-5)


def test_shipped_reference_checkpoint_loads_with_its_card():
    model = create_model("deepheme-resnext50")
    assert model.trained and model.spec.architecture == "resnext50_32x4d"
    assert set(model.class_codes) == {"B2", "E4", "ER", "L2", "M2", "M3", "M4", "M5", "M6",
                                      "MO2", "PLT"}
    assert model.card["input_mpp"] == 0.25 and model.card["input_px"] == 96
    assert model.card["metrics"]["test"]["macro_f1"] > 0.85
    # its softmax temperature (fitted on the validation split) is applied as it loads
    assert model.temperature == model.card["temperature"]["value"] < 1
    raw = create_model("deepheme-resnext50", calibrated=False)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model.module(x) * model.temperature, raw.module(x),
                                   rtol=1e-4, atol=1e-4)


def _resnext():
    """The reference ResNeXt-50 where the tree has its checkpoint, else the same seeded random
    weights on every call: a GPU run through the device tool leaves the 47 MB file behind
    (benchmarks/device/README.md)."""
    torch.manual_seed(0)
    trained = os.path.exists(get_spec("deepheme-resnext50").checkpoint_uri())
    return create_model("deepheme-resnext50", allow_untrained=not trained,
                        class_codes=None if trained else [f"C{i}" for i in range(11)]), trained


@pytest.mark.gpu
def test_gpu_bf16_channels_last_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, trained = _resnext()
    crops = np.random.default_rng(4).integers(0, 255, (8, 96, 96, 3), dtype=np.uint8)
    cpu = Predictor(model, "cpu").predict(crops)
    gpu = Predictor(_resnext()[0], "cuda").predict(crops)
    if trained:  # random weights give near-equal logits, whose order bf16 may swap
        assert (cpu.argmax(1) == gpu.argmax(1)).mean() >= 0.75
    np.testing.assert_allclose(cpu, gpu, atol=0.1)
    compiled = Predictor(_resnext()[0], "cuda", compile=True).predict(crops)
    np.testing.assert_allclose(compiled, gpu, atol=0.05)


@pytest.mark.gpu
def test_gpu_padded_batches_give_the_unpadded_outputs():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    crops = np.random.default_rng(5).integers(0, 255, (37, 96, 96, 3), dtype=np.uint8)
    padded = Predictor(_resnext()[0], "cuda", bucket=32)
    plain = Predictor(_resnext()[0], "cuda", bucket=0)
    padded.warmup(64)
    assert padded.predict(crops).shape == (37, 11)
    np.testing.assert_allclose(padded.predict(crops), plain.predict(crops), atol=0.02)
    np.testing.assert_allclose(padded.embed(crops), plain.embed(crops), rtol=0.05, atol=0.05)
    tiles = np.random.default_rng(6).integers(0, 255, (5, 224, 224, 3), dtype=np.uint8)
    enc = create_model("dinov2-vits14", allow_untrained=True)
    np.testing.assert_allclose(Predictor(enc, "cuda", bucket=32).embed(tiles),
                               Predictor(enc, "cuda", bucket=0).embed(tiles), rtol=0.05, atol=0.05)


@pytest.mark.gpu
def test_gpu_pipelined_chunks_give_the_one_pass_outputs():
    """Chunks staged in two pinned buffers and copied on a side stream while the model runs:
    a buffer rewritten too early would give another crop's scores."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    crops = np.random.default_rng(7).integers(0, 255, (70, 96, 96, 3), dtype=np.uint8)
    crops.flags.writeable = False  # as Ray Data hands batches over
    rows = np.random.default_rng(8).permutation(70)[:45]
    one = Predictor(_resnext()[0], "cuda", bucket=0, chunk=256)
    many = Predictor(_resnext()[0], "cuda", bucket=0, chunk=8)
    np.testing.assert_allclose(many.predict(crops), one.predict(crops), atol=0.02)
    np.testing.assert_allclose(many.predict(crops, rows=rows), one.predict(crops[rows]),
                               atol=0.02)
    np.testing.assert_allclose(many.embed(crops), one.embed(crops), rtol=0.05, atol=0.05)
    from engine.models.inference import Stacked  # a block's chunks, gathered in place

    stacked = Stacked([crops[:13], crops[13:50], crops[50:]])
    np.testing.assert_allclose(many.predict(stacked, rows=np.sort(rows)),
                               one.predict(crops[np.sort(rows)]), atol=0.02)
    np.testing.assert_allclose(many.embed(stacked), one.embed(crops), rtol=0.05, atol=0.05)
    small = np.ascontiguousarray(crops[:20, :64, :64])  # another row shape: new buffers
    np.testing.assert_allclose(many.predict(small), one.predict(small), atol=0.02)
    assert many._staging[0][0].is_pinned()


@pytest.mark.gpu
def test_gpu_cuda_graphs_give_the_eager_outputs():
    """Each padded shape replayed as a captured graph, in an order unlike the capture's, with
    and without TTA, features and a feature density: the eager pass's outputs, the right
    rows each time (a graph's outputs are overwritten by its next replay)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from engine.models.ood import FeatureDensity

    model = _resnext()[0]
    eager, graphed = Predictor(model, "cuda"), Predictor(model, "cuda", graphs=True)
    assert graphed.graphs and not eager.graphs
    graphed.warmup(64, tta=True)
    assert {shape[0] for (path, shape) in graphed._graphed} == {32, 64}
    rng = np.random.default_rng(9)
    for n in (37, 5, 64, 33, 5):  # buckets 64, 32, 64, 64, 32: replays out of capture order
        crops = rng.integers(0, 255, (n, 96, 96, 3), dtype=np.uint8)
        np.testing.assert_allclose(graphed.predict(crops), eager.predict(crops), atol=0.02)
        np.testing.assert_allclose(graphed.predict(crops, tta=True),
                                   eager.predict(crops, tta=True), atol=0.02)
    dim = model.module.num_features
    gen = torch.Generator().manual_seed(0)
    density = FeatureDensity(torch.randn(dim, generator=gen), torch.eye(dim),
                             torch.randn(3, dim, generator=gen), 1.0)
    for p in (eager, graphed):
        p.density = density.to("cuda")
    crops = rng.integers(0, 255, (70, 96, 96, 3), dtype=np.uint8)
    rows = rng.permutation(70)[:45]
    (pe, de, fe), (pg, dg, fg) = (p.score(crops, rows=rows, features=True)
                                  for p in (eager, graphed))
    np.testing.assert_allclose(pg, pe, atol=0.02)
    np.testing.assert_allclose(dg, de, rtol=0.05, atol=0.05)
    np.testing.assert_allclose(fg, fe, rtol=0.05, atol=0.05)
    assert graphed.graphs, graphed.graphs_error  # replayed throughout: no eager fallback
    assert {path[0] for (path, shape) in graphed._graphed} >= {"views", "score"}
    tiles = rng.integers(0, 255, (40, 224, 224, 3), dtype=np.uint8)
    enc = create_model("dinov2-vits14", allow_untrained=True)
    encoder = Predictor(enc, "cuda", graphs=True)
    np.testing.assert_allclose(encoder.embed(tiles), Predictor(enc, "cuda").embed(tiles),
                               rtol=0.05, atol=0.05)
    assert encoder.graphs and encoder._graphed, encoder.graphs_error


def test_cuda_graphs_are_off_where_they_cannot_run():
    """On a CPU, with compile or without buckets the predictor runs eager, with the same
    outputs (the pipeline's ``cuda_graphs`` switch is harmless on a CPU-only cluster)."""
    model = create_model("deepheme-tiny", allow_untrained=True, class_codes=CODES, seed=0)
    crops = np.random.default_rng(10).integers(0, 255, (6, 96, 96, 3), dtype=np.uint8)
    graphed = Predictor(model, "cpu", graphs=True)
    assert not graphed.graphs
    np.testing.assert_array_equal(graphed.predict(crops), Predictor(model, "cpu").predict(crops))
    assert not graphed._graphed
    # where a shape cannot be captured (or its replay disagrees), the pass runs eager and
    # graphs stay off, with a warning saying why
    graphed.graphs, graphed.bucket = True, 4

    def refuse(run, shape):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphed._capture = refuse
    with pytest.warns(RuntimeWarning, match="CUDA graphs off for deepheme-tiny"):
        fallback = graphed.predict(crops)
    np.testing.assert_array_equal(fallback, Predictor(model, "cpu").predict(crops))
    assert not graphed.graphs and "not permitted" in graphed.graphs_error
    if torch.cuda.is_available():
        assert not Predictor(model, "cuda", graphs=True, compile=True).graphs
        assert not Predictor(model, "cuda", graphs=True, bucket=0).graphs


def test_a_model_compiled_on_a_cpu_serves_every_batch_size_with_one_graph(monkeypatch):
    """``compile`` on a CPU (Inductor, the weights frozen into the graph, the batch dimension
    dynamic): `warmup` compiles the path the actor scores, and every batch after it, of 0,
    1 or 100 rows, runs that one graph (a recompile here is an error) with eager's outputs.
    Inductor's real code generation, as a CPU-only node runs it (about 33 s here)."""
    from torch._dynamo import config as dynamo
    from torch._inductor import config as inductor

    monkeypatch.setattr(inductor, "freezing", inductor.freezing)  # as it was, after the test
    model = create_model("deepheme-tiny", allow_untrained=True, class_codes=CODES, seed=0)
    crops = np.random.default_rng(11).integers(0, 255, (100, 96, 96, 3), dtype=np.uint8)
    compiled = Predictor(model, "cpu", compile=True, chunk=64)
    assert compiled.compiled and inductor.freezing
    compiled.warmup(64, features=True)  # the pipeline's path: probabilities and features
    eager = Predictor(model, "cpu", chunk=64)
    with monkeypatch.context() as m:
        m.setattr(dynamo, "error_on_recompile", True)
        for n in (0, 1, 7, 100):  # 100: a pass of 64 rows and one of 36
            (pc, _, fc), (pe, _, fe) = (p.score(crops[:n], features=True)
                                        for p in (compiled, eager))
            assert pc.shape == (n, len(CODES)) and fc.shape == fe.shape
            np.testing.assert_allclose(pc, pe, atol=0.02)
            np.testing.assert_allclose(fc, fe, rtol=0.05, atol=0.05)
    assert not Predictor(model, "cpu").compiled


def test_a_cpu_compile_that_fails_leaves_the_model_eager(monkeypatch):
    """A CPU node without what Inductor needs (a C++ compiler) fails the compile at the
    actor's warm-up: the model runs eager, with a warning saying why, not a crashed actor."""
    from torch._inductor import config as inductor

    monkeypatch.setattr(inductor, "freezing", inductor.freezing)

    def compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return compiled

    monkeypatch.setattr(torch, "compile", compile)
    model = create_model("deepheme-tiny", allow_untrained=True, class_codes=CODES, seed=0)
    crops = np.random.default_rng(12).integers(0, 255, (5, 96, 96, 3), dtype=np.uint8)
    p = Predictor(model, "cpu", compile=True)
    with pytest.warns(RuntimeWarning, match="compile off for deepheme-tiny on the CPU: "
                                            "RuntimeError: InvalidCxxCompiler"):
        p.warmup(16)
    assert not p.compiled and "C++ compiler" in p.compile_error
    np.testing.assert_array_equal(p.predict(crops), Predictor(model, "cpu").predict(crops))


def test_ensemble_averages_its_members_and_refuses_other_codes(tmp_path):
    from engine.models import EnsemblePredictor

    torch.manual_seed(0)
    members = [create_model("deepheme-tiny", allow_untrained=True, class_codes=CODES)
               for _ in range(3)]
    crops = np.random.default_rng(2).integers(0, 255, (5, 96, 96, 3), dtype=np.uint8)
    each = [Predictor(m, "cpu").predict(crops) for m in members]
    assert not np.allclose(each[0], each[1])  # different weights, different outputs
    ensemble = EnsemblePredictor(members, "cpu")
    assert len(ensemble) == 3 and ensemble.model is members[0]
    np.testing.assert_allclose(ensemble.predict(crops), np.mean(each, axis=0), atol=1e-6)
    other = create_model("deepheme-tiny", allow_untrained=True, class_codes=CODES[::-1])
    with pytest.raises(ValueError, match="same codes"):
        EnsemblePredictor([members[0], other], "cpu")


def test_cpu_bf16_autocast_follows_the_hardware_and_stays_close_to_fp32(tmp_path):
    from engine.models.inference import native_bf16

    model, _ = _tiny(tmp_path)
    crops = np.random.default_rng(3).integers(0, 255, (6, 96, 96, 3), dtype=np.uint8)
    auto, fp32 = Predictor(model, "cpu"), Predictor(model, "cpu", amp=False)
    assert auto.amp == native_bf16("cpu") and auto.channels_last == auto.amp
    assert not fp32.amp and not fp32.channels_last
    assert native_bf16("cuda") and not native_bf16("meta")
    np.testing.assert_allclose(auto.predict(crops), fp32.predict(crops), atol=0.05)
    np.testing.assert_allclose(auto.embed(crops), fp32.embed(crops), atol=0.1, rtol=0.05)
