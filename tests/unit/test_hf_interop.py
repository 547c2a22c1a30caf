"""moetron <-> Hugging Face DeepSeek-V3 interop: random tiny models, logits equal in FP32 both ways, the published
file layout, MTP weights bit-exact through export -> import, FP8 and fused-expert inputs, and clear errors.

The transformers model runs with attn_implementation="eager" (moetron uses SDPA); logits must agree to 1e-4."""

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from moetron.checkpoint import CheckpointStore  # noqa: E402
from moetron.checkpoint.state import model_entries  # noqa: E402
from moetron.config import ConfigError, MoetronConfig  # noqa: E402
from moetron.config.hydra import to_yaml  # noqa: E402
from moetron.hf import export_checkpoint, import_checkpoint, model_config  # noqa: E402
from moetron.hf.__main__ import main as cli  # noqa: E402
from moetron.hf.convert import load_run_config, read_checkpoint  # noqa: E402
from moetron.model import DeepSeekV3  # noqa: E402
from moetron.model.mtp import shift_left  # noqa: E402

TOL = 1e-4
VOCAB, SEQ = 96, 12
BASE = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
    qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
    topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
    max_position_embeddings=256, num_nextn_predict_layers=1, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.8, "mscale_all_dim": 1.0}
# HF scores a group by its top-2 sum, moetron by its top K/M: every case with n_group > 1 has K/M == 2.
CASES = {
    "qlora_groups2_yarn": dict(rope_parameters=YARN),
    "no_qlora_2shared": dict(q_lora_rank=None, n_group=1, topk_group=1, num_experts_per_tok=3, n_routed_experts=6,
                             n_shared_experts=2, routed_scaling_factor=1.0),
    "groups4_top2_all_moe_mtp2": dict(n_group=4, topk_group=2, num_experts_per_tok=4, first_k_dense_replace=0,
                                      num_nextn_predict_layers=2, norm_topk_prob=False),
}


def hf_cfg(case: str) -> DeepseekV3Config:
    return DeepseekV3Config(**{**BASE, **CASES[case]})


def randomize(params, buffers, seed: int) -> None:
    """Weights at scale 1/sqrt(fan_in) (well-separated router scores), norms around 1, a non-zero balancing bias."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in params:
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
        for name, b in buffers:
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def load_ours(run_dir) -> DeepSeekV3:
    """Through the trainer's own resume path: CheckpointStore.load_latest into the model's checkpoint keys."""
    config = load_run_config(run_dir / "config.yaml")
    model = DeepSeekV3(config.model)
    loaded = CheckpointStore(run_dir / "checkpoints").load_latest(model_entries(model))
    assert loaded is not None and loaded.train_state["step"] == 0
    return model.eval()


def make_run(tmp_path, cfg, seed: int = 1, step: int = 5):
    """A moetron run dir with a random model (MTP and biases included) and a checkpoint of it."""
    model = DeepSeekV3(cfg)
    randomize(model.named_parameters(), model.named_buffers(), seed)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(MoetronConfig(model=cfg)))
    CheckpointStore(run / "checkpoints").save(step, model_entries(model),
                                              {"step": step, "tokens": 0, "sequences": 0, "has_optimizer": False})
    return model.eval(), run


def mtp_logits(model: DeepSeekV3, ids: torch.Tensor) -> list[torch.Tensor]:
    cos, sin = model.rope(ids.shape[1], ids.device)
    h = model.embed_tokens(ids)
    for layer in model.layers:
        h = layer(h, cos, sin)
    out = []
    for k, module in enumerate(model.mtp, start=1):
        h = module(h, model.embed_tokens(shift_left(ids, k, fill=0)), cos, sin)
        out.append(model.lm_head(module.norm(h)))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_moetron_logits(tmp_path, case):
    hf = DeepseekV3ForCausalLM._from_config(hf_cfg(case), attn_implementation="eager")
    randomize(hf.named_parameters(), hf.named_buffers(), seed=0)
    hf.eval().save_pretrained(tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:  # what transformers v5 writes
        names = set(f.keys())
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in names  # per-expert, the published layout
    assert not any(n.endswith("experts.gate_up_proj") for n in names)

    report = import_checkpoint(tmp_path / "hf", tmp_path / "run", name="hf_case")
    assert any("fresh initialization" in note for note in report.notes)  # save_pretrained drops the MTP layer
    assert (tmp_path / "run" / "conf" / "model" / "hf_case.yaml").is_file()
    ours = load_ours(tmp_path / "run")
    with torch.no_grad():
        diff = (hf(tokens()).logits - ours(tokens()).logits).abs().max().item()
    print(f"max abs logit diff HF->moetron [{case}]: {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_moetron_to_hf_logits_and_mtp_roundtrip(tmp_path, case):
    cfg = model_config(hf_cfg(case).to_dict(), "test", name="case")
    ours, run = make_run(tmp_path, cfg)
    export_checkpoint(run, tmp_path / "hf", dtype="fp32")
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    for key, value in CASES[case].items():  # config.json means the same to transformers
        got = getattr(hf.config, key)
        assert all(got[k] == v for k, v in value.items()) if isinstance(value, dict) else got == value, key
    with torch.no_grad():
        diff = (hf(tokens()).logits - ours(tokens()).logits).abs().max().item()
    print(f"max abs logit diff moetron->HF [{case}]: {diff:.2e}")
    assert diff <= TOL

    import_checkpoint(tmp_path / "hf", tmp_path / "back", name="back", mtp="require")
    back = read_checkpoint(tmp_path / "back" / "checkpoints" / "step_00000000", cfg)
    original = ours.state_dict()
    assert back.keys() == original.keys()
    for name, tensor in original.items():  # everything, MTP modules included, bit-exact in FP32
        assert torch.equal(back[name], tensor), name


def test_mtp_layer_matches_transformers_mtp_model(tmp_path):
    """The exported MTP layer (eh_proj column order, shared_head.norm) computes what transformers' MtpLayer computes,
    given the same previous hidden state (moetron feeds the main model's pre-final-norm state, arXiv 2412.19437 §2.2)."""
    mtp_mod = pytest.importorskip("transformers.modeling_layers")
    if not hasattr(mtp_mod, "MtpModel"):
        pytest.skip("this transformers has no MtpModel")
    cfg = model_config(hf_cfg("qlora_groups2_yarn").to_dict(), "test", name="case")
    ours, run = make_run(tmp_path, cfg)
    export_checkpoint(run, tmp_path / "hf", dtype="fp32")
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    mtp = mtp_mod.MtpModel(hf, 1).eval()
    layer = f"model.layers.{cfg.num_hidden_layers}."
    published = {k[len(layer):]: v for k, v in load_file(tmp_path / "hf" / "model.safetensors").items()
                 if k.startswith(layer)}
    state = {}
    for rest, value in published.items():
        if rest.split(".")[0] in ("enorm", "hnorm", "eh_proj"):
            state[f"layers.0.{rest}"] = value
        elif rest == "shared_head.norm.weight":
            state["layers.0.post_norm.weight"] = value
        elif ".experts." not in rest and not rest.startswith(("shared_head.head", "embed_tokens")):
            state[f"layers.0.mtp_block.{rest}"] = value
    experts = range(cfg.n_routed_experts)
    state["layers.0.mtp_block.mlp.experts.gate_up_proj"] = torch.stack([
        torch.cat([published[f"mlp.experts.{e}.gate_proj.weight"], published[f"mlp.experts.{e}.up_proj.weight"]])
        for e in experts])
    state["layers.0.mtp_block.mlp.experts.down_proj"] = torch.stack(
        [published[f"mlp.experts.{e}.down_proj.weight"] for e in experts])
    missing, unexpected = mtp.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"embed_tokens.weight", "shared_head.weight"}

    ids = tokens()
    with torch.no_grad():
        cos, sin = ours.rope(SEQ, ids.device)
        h = ours.embed_tokens(ids)
        for block in ours.layers:
            h = block(h, cos, sin)
        theirs = mtp._project_to_logits(
            mtp.forward_layer(0, h, torch.arange(SEQ)[None], None, input_ids=shift_left(ids, 1, fill=0)))
        diff = (theirs - mtp_logits(ours, ids)[0]).abs().max().item()
    print(f"max abs MTP logit diff moetron vs transformers MtpLayer: {diff:.2e}")
    assert diff <= TOL


def test_published_layout_bf16_sharded(tmp_path):
    cfg = model_config(hf_cfg("groups4_top2_all_moe_mtp2").to_dict(), "test", name="case")
    ours, run = make_run(tmp_path, cfg, step=3)
    step_dir = run / "checkpoints" / "step_00000003"
    report = export_checkpoint(step_dir, tmp_path / "hf", dtype="bf16", max_shard_size="64KB")
    dst = tmp_path / "hf"
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert set(report.files) >= set(files)
    tensors = {}
    for file in files:
        tensors.update(load_file(dst / file))
    assert set(tensors) == set(index["weight_map"])
    L, E, H, Im = cfg.num_hidden_layers, cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    shapes = {
        "model.embed_tokens.weight": [VOCAB, H], "lm_head.weight": [VOCAB, H], "model.norm.weight": [H],
        "model.layers.0.self_attn.q_a_proj.weight": [24, H],
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": [16 + 8, H],
        "model.layers.0.mlp.gate.weight": [E, H], "model.layers.0.mlp.gate.e_score_correction_bias": [E],
        f"model.layers.2.mlp.experts.{E - 1}.gate_proj.weight": [Im, H],
        "model.layers.2.mlp.experts.0.up_proj.weight": [Im, H],
        "model.layers.2.mlp.experts.0.down_proj.weight": [H, Im],
        "model.layers.2.mlp.shared_experts.down_proj.weight": [H, Im],
    }
    for k in range(2):  # two MTP modules: layers L and L+1
        shapes.update({
            f"model.layers.{L + k}.enorm.weight": [H], f"model.layers.{L + k}.hnorm.weight": [H],
            f"model.layers.{L + k}.eh_proj.weight": [H, 2 * H],
            f"model.layers.{L + k}.shared_head.norm.weight": [H],
            f"model.layers.{L + k}.shared_head.head.weight": [VOCAB, H],
            f"model.layers.{L + k}.embed_tokens.weight": [VOCAB, H],
            f"model.layers.{L + k}.self_attn.q_b_proj.weight": [4 * 16, 24],
            f"model.layers.{L + k}.mlp.experts.3.down_proj.weight": [H, Im],
            f"model.layers.{L + k}.mlp.gate.e_score_correction_bias": [E],
        })
    for name, shape in shapes.items():
        assert list(tensors[name].shape) == shape, name
    assert not any("gate_up_proj" in n or n.startswith(("layers.", "mtp.")) for n in tensors)
    assert tensors["model.layers.0.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert tensors["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16
    assert torch.equal(tensors[f"model.layers.{L}.shared_head.head.weight"], tensors["lm_head.weight"])
    assert torch.equal(tensors[f"model.layers.{L + 1}.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    state = ours.state_dict()
    H2 = cfg.hidden_size  # published eh_proj acts on [enorm(emb); hnorm(h)], moetron's on [hnorm(h); enorm(emb)]
    assert torch.equal(tensors[f"model.layers.{L}.eh_proj.weight"][:, :H2],
                       state["mtp.0.eh_proj.weight"][:, H2:].bfloat16())
    gate_up = state["layers.2.mlp.experts.gate_up_proj"]
    assert torch.equal(tensors["model.layers.2.mlp.experts.5.up_proj.weight"], gate_up[5, Im:].bfloat16())

    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["rope_interleave"] is True and config["tie_word_embeddings"] is False
    assert config["torch_dtype"] == "bfloat16" and config["num_nextn_predict_layers"] == 2
    assert (config["n_group"], config["topk_group"], config["num_key_value_heads"]) == (4, 2, 4)
    # bf16 files import again (sharded, through the index)
    import_checkpoint(dst, tmp_path / "back", name="back", mtp="require")
    back = read_checkpoint(tmp_path / "back" / "checkpoints" / "step_00000000", cfg)
    assert torch.equal(back["mtp.1.eh_proj.weight"], state["mtp.1.eh_proj.weight"].bfloat16().float())


def test_fused_and_fp8_inputs(tmp_path):
    """transformers' in-memory layout (fused 3-D experts) and the published block-scaled FP8 weights both import."""
    config = hf_cfg("qlora_groups2_yarn")
    hf = DeepseekV3ForCausalLM._from_config(config, attn_implementation="eager")
    randomize(hf.named_parameters(), hf.named_buffers(), seed=3)
    hf.eval()
    fused = tmp_path / "fused"
    fused.mkdir()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    save_file(state, str(fused / "model.safetensors"))
    config.to_json_file(str(fused / "config.json"))
    import_checkpoint(fused, tmp_path / "run_fused", name="fused", mtp="drop")
    ours = load_ours(tmp_path / "run_fused")
    assert ours.cfg.num_nextn_predict_layers == 0
    with torch.no_grad():
        diff = (hf(tokens()).logits - ours(tokens()).logits).abs().max().item()
    print(f"max abs logit diff HF(fused layout)->moetron: {diff:.2e}")
    assert diff <= TOL

    # FP8: quantize every linear weight of the main layers per 16x16 block, as the published checkpoint does per 128x128
    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    block = 16
    stored, originals = {}, {}
    for name, w in ours.state_dict().items():
        key = name if name == "lm_head.weight" else f"model.{name}"
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            stored[key] = w  # (fused experts stay high precision here)
        elif w.dim() == 2 and "layers." in name and not name.endswith("gate.weight"):
            rows, cols = w.shape
            tiles = torch.nn.functional.pad(w, (0, -cols % block, 0, -rows % block))
            tiles = tiles.view(tiles.shape[0] // block, block, tiles.shape[1] // block, block)
            scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-4) / 448.0
            expanded = scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
            stored[key] = (w / expanded).clamp(-448, 448).to(torch.float8_e4m3fn)
            stored[f"{key}_scale_inv"] = scale
            originals[name] = w
        else:
            stored[key] = w
    save_file({k: v.contiguous() for k, v in stored.items()}, str(fp8 / "model.safetensors"))
    published = json.loads((fused / "config.json").read_text())
    published["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [block, block]}
    published["num_nextn_predict_layers"] = 0
    (fp8 / "config.json").write_text(json.dumps(published))
    import_checkpoint(fp8, tmp_path / "run_fp8", name="fp8")
    back = read_checkpoint(tmp_path / "run_fp8" / "checkpoints" / "step_00000000", ours.cfg)
    for name, w in originals.items():
        err = (back[name] - w).abs()
        assert (err <= 0.07 * w.abs() + 1e-6).all(), name  # E4M3 keeps 3 mantissa bits: <= 6.25 % per element
        assert not torch.equal(back[name], w)


def test_errors_name_the_problem(tmp_path, capsys):
    hf = DeepseekV3ForCausalLM._from_config(hf_cfg("no_qlora_2shared"), attn_implementation="eager")
    hf.save_pretrained(tmp_path / "hf")
    good = tmp_path / "hf"
    tensors = load_file(good / "model.safetensors")

    def variant(name, edit=None, config_edit=None):
        path = tmp_path / name
        path.mkdir()
        data = dict(tensors)
        if edit:
            edit(data)
        save_file(data, str(path / "model.safetensors"))
        config = json.loads((good / "config.json").read_text())
        if config_edit:
            config_edit(config)
        (path / "config.json").write_text(json.dumps(config))
        return path

    missing = "model.layers.2.mlp.experts.4.up_proj.weight"
    with pytest.raises(ConfigError, match=missing.replace(".", r"\.")):
        import_checkpoint(variant("missing", lambda d: d.pop(missing)), tmp_path / "r1")
    wrong = "model.layers.1.self_attn.kv_b_proj.weight"
    with pytest.raises(ConfigError, match=rf"{wrong}.*shape \[4, 4\]"):
        import_checkpoint(variant("shape", lambda d: d.__setitem__(wrong, torch.zeros(4, 4))), tmp_path / "r2")
    with pytest.raises(ConfigError, match="scoring_func.*softmax"):
        import_checkpoint(variant("softmax", config_edit=lambda c: c.__setitem__("scoring_func", "softmax")),
                          tmp_path / "r3")
    with pytest.raises(ConfigError, match="MTP layer 3"):
        import_checkpoint(good, tmp_path / "r4", mtp="require")
    corrupt = variant("corrupt")
    raw = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ConfigError, match="model.safetensors"):
        import_checkpoint(corrupt, tmp_path / "r5")
    no_config = tmp_path / "no_config"
    shutil.copytree(good, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json is missing"):
        import_checkpoint(no_config, tmp_path / "r6")
    with pytest.raises(ConfigError, match="built-in"):
        import_checkpoint(good, tmp_path / "r7", name="tiny")
    with pytest.raises(ConfigError, match="train.seq_len"):
        import_checkpoint(good, tmp_path / "r8", overrides=["train.seq_len=512"])

    import_checkpoint(good, tmp_path / "ok")
    with pytest.raises(ConfigError, match="already has checkpoints"):
        import_checkpoint(good, tmp_path / "ok")
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        export_checkpoint(tmp_path / "hf", tmp_path / "out")
    export_checkpoint(tmp_path / "ok", tmp_path / "out")
    with pytest.raises(ConfigError, match="already holds"):
        export_checkpoint(tmp_path / "ok", tmp_path / "out")

    for argv in (["import", str(tmp_path / "nowhere"), str(tmp_path / "r9")],
                 ["export", str(tmp_path / "ok"), str(tmp_path / "out")]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("moetron: error: ") and "Traceback" not in err
    assert cli(["export", str(tmp_path / "ok"), str(tmp_path / "out"), "--overwrite", "--dtype", "fp32"]) == 0
    assert "continue training with" not in capsys.readouterr().out


def test_imported_run_resumes_in_the_trainer(tmp_path):
    """The printed continuation (`--config-dir DST/conf model=NAME run.dir=DST OVERRIDES`) resumes from step 0."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from moetron.config.hydra import register_schema, to_config
    from moetron.train.trainer import Trainer

    hf = DeepseekV3ForCausalLM._from_config(DeepseekV3Config(**{**BASE, "vocab_size": 264}))
    hf.save_pretrained(tmp_path / "hf")
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 4}) + "\n"
                              for i in range(40)))
    overrides = [f"data.train_files=[{corpus}]", f"data.val_files=[{corpus}]", "data.tokenizer=null", "train.seq_len=32",
                 "train.micro_batch_size=2", "train.global_batch_size=2", "train.batch_ramp_start=2"]
    dst = tmp_path / "run"
    report = import_checkpoint(tmp_path / "hf", dst, overrides=overrides, name="from_hf")
    assert f"--config-dir {dst / 'conf'} model=from_hf run.dir={dst}" in report.next_command

    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="moetron.hydra_conf", version_base=None):
        cfg = compose("config", overrides=[f"hydra.searchpath=[file://{dst / 'conf'}]", "model=from_hf",
                                           f"run.dir={dst}", *overrides, "train.steps=1", "train.eval_every=0",
                                           "run.progress=false"])
    GlobalHydra.instance().clear()
    trainer = Trainer(to_config(cfg))
    trainer.fit()
    events = [json.loads(line) for line in (dst / "events.jsonl").read_text().splitlines()]
    resume = next(e for e in events if e["event"] == "resume")
    assert resume["step"] == 0 and resume["checkpoint"].endswith("step_00000000")
    assert (dst / "checkpoints" / "step_00000001").is_dir()
