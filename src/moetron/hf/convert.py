"""Export moetron checkpoints to the published DeepSeek-V3 Hugging Face layout, and import such directories as
new moetron runs (arXiv 2412.19437 §2.1.1 names, §1.4 MTP layout). The CLI is `python -m moetron.hf` (see __main__.py)."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf

from moetron.checkpoint import CheckpointStore
from moetron.checkpoint.metadata import SafeFileSystemReader, read_dcp_metadata
from moetron.checkpoint.state import model_entries
from moetron.checkpoint.store import STEP_DIR, TRAIN_STATE
from moetron.config import ConfigError, ModelConfig, MoetronConfig
from moetron.config.hydra import to_yaml
from moetron.hf.config import hf_config, model_config, routing_mismatch
from moetron.hf.safetensors_io import INDEX, SafetensorsDir, parse_size, write_sharded
from moetron.hf.tensors import from_hf, to_hf
from moetron.model import DeepSeekV3

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
MODEL_CONF_DIR = "conf"  # DST/conf/model/<name>.yaml: the imported model as a Hydra `model=` option


@dataclass
class Report:
    """What a conversion did, for the CLI to print."""

    source: Path
    destination: Path
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    next_command: str | None = None


def _meta_model(cfg: ModelConfig) -> DeepSeekV3:
    with torch.device("meta"):
        return DeepSeekV3(cfg)


def expected_state(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Names and shapes of a DeepSeekV3 state dict for `cfg` (built on the meta device: no memory, no init)."""
    return {name: t.shape for name, t in _meta_model(cfg).state_dict().items()}


def model_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> DeepSeekV3:
    """A DeepSeekV3 that owns `state`'s tensors (no random init, no second copy)."""
    model = _meta_model(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    for module in model.modules():  # non-persistent statistics buffers are not in the state: make them real
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype)
    return model


# --------------------------------------------------------------------------------------------- export
def resolve_checkpoint(src: Path) -> tuple[Path, Path]:
    """A run dir (newest complete checkpoint) or one step_NNNNNNNN dir -> (checkpoint dir, the run's config.yaml)."""
    if not src.is_dir():
        raise ConfigError(f"Export source {src} does not exist or is not a directory. Valid: a run directory "
                          "(with config.yaml and checkpoints/) or one of its checkpoints/step_NNNNNNNN directories.")
    if STEP_DIR.match(src.name):
        return src, src.parent.parent / "config.yaml"
    complete = [p for p in CheckpointStore(src / "checkpoints").complete() if (p / TRAIN_STATE).is_file()]
    if not complete:
        raise ConfigError(f"Export source {src} has no complete checkpoint under {src / 'checkpoints'}. Valid: a run "
                          "directory that has saved at least one checkpoint, or a step_NNNNNNNN directory.")
    return complete[-1], src / "config.yaml"


def load_run_config(path: Path) -> MoetronConfig:
    if not path.is_file():
        raise ConfigError(f"The run's config file {path} is missing. Valid: the config.yaml that "
                          "`python -m moetron.train` writes into run.dir (a step directory must sit in RUN/checkpoints/).")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(MoetronConfig), OmegaConf.load(path))
        config = OmegaConf.to_object(merged)
    except Exception as err:  # OmegaConf raises several types for bad YAML or unknown keys
        raise ConfigError(f"{path} is not a valid moetron config ({type(err).__name__}: {err}). Valid: the "
                          "config.yaml written by `python -m moetron.train`.") from err
    config.model.validate()
    return config


def read_checkpoint(step_dir: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model tensors of a moetron DCP checkpoint (with or without optimizer state), checked against `cfg`.
    Checkpoints store each routed expert on its own (model.<stack>.<global id>, checkpoint/state.py): those
    load straight into the rows of the stacked tensor."""
    stored = read_dcp_metadata(step_dir).state_dict_metadata  # no general unpickling: ConfigError naming the file
    state, flat = {}, {}  # flat: the DCP keys to load, each into a tensor (or an expert's row) of `state`
    for name, shape in expected_state(cfg).items():
        meta = stored.get(f"model.{name}")
        per_expert = meta is None and f"model.{name}.0" in stored  # routed experts stored one per global id
        if per_expert:
            meta = stored[f"model.{name}.0"]
            if f"model.{name}.{shape[0] - 1}" not in stored or f"model.{name}.{shape[0]}" in stored:
                raise ConfigError(f"Checkpoint {step_dir} does not hold exactly {shape[0]} experts for `{name}`, as "
                                  "the run's config.yaml implies. Valid: a checkpoint of the model config.yaml describes.")
            meta_shape = [shape[0], *meta.size]
        elif meta is None or not hasattr(meta, "size"):
            raise ConfigError(f"Checkpoint {step_dir} has no tensor `{name}`, which the run's config.yaml implies. "
                              "Valid: a checkpoint of the model that config.yaml describes.")
        else:
            meta_shape = list(meta.size)
        if tuple(meta_shape) != tuple(shape):
            raise ConfigError(f"Tensor `{name}` in checkpoint {step_dir} has shape {meta_shape}, but the run's "
                              f"config.yaml implies {list(shape)}. Valid: a checkpoint of the model config.yaml describes.")
        state[name] = torch.empty(shape, dtype=meta.properties.dtype)
        # A distributed checkpoint's experts load straight into their rows of the stacked tensor (no copy).
        flat.update({f"{name}.{i}": state[name][i] for i in range(shape[0])} if per_expert else {name: state[name]})
    try:
        with warnings.catch_warnings():  # DCP warns that it runs without a process group: intended
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": flat}, storage_reader=SafeFileSystemReader(str(step_dir)))
    except Exception as err:
        raise ConfigError(f"Checkpoint {step_dir} is incomplete or corrupt ({type(err).__name__}: {err}).") from err
    return state


def _tokenizer_eos(config: MoetronConfig) -> tuple[int | None, Path | None]:
    """The eos id of the run's tokenizer, and its file (copied next to the weights) if it has one."""
    try:
        from moetron.data.tokenizer import load_tokenizer

        tok = load_tokenizer(config.data.tokenizer, config.data.special_tokens)
    except Exception:  # the tokenizer file may not travel with the checkpoint; the ids are optional
        return None, None
    path = Path(config.data.tokenizer) if config.data.tokenizer else None
    return tok.eos_id, path if path and path.is_file() else None


def export_checkpoint(src: str | Path, dst: str | Path, dtype: str = "bf16", max_shard_size: str = "5GB",
                      overwrite: bool = False, allow_routing_mismatch: bool = False) -> Report:
    """moetron checkpoint -> HF directory: config.json + safetensors in the published DeepSeek-V3 layout."""
    src, dst = Path(src), Path(dst)
    if dtype not in DTYPES:
        raise ConfigError(f"Invalid value for `--dtype`: {dtype!r}. Valid: bf16 or fp32.")
    out_dtype, max_bytes = DTYPES[dtype], parse_size(max_shard_size)
    step_dir, config_path = resolve_checkpoint(src)
    config = load_run_config(config_path)
    cfg = config.model
    if (why := routing_mismatch(cfg)) and not allow_routing_mismatch:
        raise ConfigError(f"{why} Valid: a model with n_group 1 or num_experts_per_tok / topk_group = 2; pass "
                          "--allow-routing-mismatch to export the weights anyway.")
    existing = sorted(p.name for p in dst.glob("*.safetensors")) + [n for n in (INDEX, "config.json") if (dst / n).exists()]
    if existing and not overwrite:
        raise ConfigError(f"Export destination {dst} already holds {', '.join(existing[:3])}. Valid: a new or empty "
                          "directory, or pass --overwrite to replace the model files there.")
    state = read_checkpoint(step_dir, cfg)
    dst.mkdir(parents=True, exist_ok=True)
    for name in existing:
        (dst / name).unlink()
    files = write_sharded(to_hf(state, cfg), dst, out_dtype, max_bytes)
    eos, tokenizer_file = _tokenizer_eos(config)
    (dst / "config.json").write_text(json.dumps(hf_config(cfg, out_dtype, eos), indent=2) + "\n")
    report = Report(step_dir, dst, files + ["config.json"])
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, dst / "tokenizer.json")
        report.files.append("tokenizer.json")
    if routing_mismatch(cfg):
        report.notes.append(routing_mismatch(cfg))
    return report


# --------------------------------------------------------------------------------------------- import
def builtin_models() -> set[str]:
    return {p.name[:-5] for p in resources.files("moetron.hydra_conf").joinpath("model").iterdir()
            if p.name.endswith(".yaml")}


def compose_run_config(overrides: list[str], model: ModelConfig, run_dir: Path) -> MoetronConfig:
    """hydra_conf/config.yaml + overrides (as `python -m moetron.train` composes it), with the imported model."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from moetron.config.hydra import register_schema

    for item in overrides:
        key = item.lstrip("+~").split("=", 1)[0]
        if key.split(".", 1)[0] in ("model", "hydra") or key == "run.dir":
            raise ConfigError(f"Invalid override {item!r}: the model comes from config.json and run.dir is the "
                              "import destination. Valid: train/data/run overrides such as train=tiny "
                              "train.seq_len=256 (the same ones you will train with).")
    register_schema()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="moetron.hydra_conf", version_base=None):
            composed = compose(config_name="config", overrides=list(overrides))
        config = OmegaConf.to_object(composed)
    except Exception as err:  # Hydra's override-parsing and composition errors
        raise ConfigError(f"Invalid overrides {overrides}: {err} Valid: Hydra overrides of the train/data/run "
                          "sections, e.g. train=tiny train.seq_len=256.") from err
    config.model = model
    config.run.dir = str(run_dir)
    return config.validate()


def _check_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"Invalid value for `--name`: {name!r}. Valid: letters, digits, '_', '-', '.'.")
    if name in builtin_models():
        raise ConfigError(f"Invalid value for `--name`: {name!r} is a built-in model preset. Valid: any other name "
                          f"(built-in: {', '.join(sorted(builtin_models()))}).")


def import_checkpoint(src: str | Path, dst: str | Path, overrides: list[str] | tuple = (), name: str = "imported",
                      mtp: str = "auto", allow_routing_mismatch: bool = False) -> Report:
    """HF directory (config.json + safetensors) -> a new moetron run dir: config.yaml, conf/model/<name>.yaml and a
    model-only checkpoint checkpoints/step_00000000 that `python -m moetron.train` resumes from.

    mtp: "auto" imports the MTP layers, initializing them fresh if the directory has none; "require" makes
    their absence an error; "drop" imports without MTP (num_nextn_predict_layers = 0)."""
    src, dst = Path(src), Path(dst)
    if mtp not in ("auto", "require", "drop"):
        raise ConfigError(f"Invalid value for `--mtp`: {mtp!r}. Valid: auto, require or drop.")
    if not src.is_dir():
        raise ConfigError(f"Import source {src} does not exist or is not a directory. Valid: a Hugging Face model "
                          "directory with config.json and safetensors weights.")
    config_json = src / "config.json"
    if not config_json.is_file():
        raise ConfigError(f"{config_json} is missing. Valid: a Hugging Face DeepSeek-V3 directory (config.json next "
                          "to model.safetensors or its shards).")
    try:
        hf = json.loads(config_json.read_text())
        if not isinstance(hf, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise ConfigError(f"{config_json} is not valid JSON ({err}). Valid: a DeepseekV3 config.json.") from err
    _check_name(name)
    cfg = model_config(hf, str(config_json), name=name)
    if mtp == "drop":
        cfg.num_nextn_predict_layers = 0
    if (why := routing_mismatch(cfg)) and not allow_routing_mismatch:
        raise ConfigError(f"{why} Valid: a model with n_group 1 or num_experts_per_tok / topk_group = 2; pass "
                          "--allow-routing-mismatch to import the weights anyway.")
    store = CheckpointStore(dst / "checkpoints")
    if store.complete():
        raise ConfigError(f"Import destination {dst} already has checkpoints ({store.complete()[-1].name}). Valid: a new "
                          "or empty run directory (importing never overwrites a run).")
    config = compose_run_config(list(overrides), cfg, dst)

    block = (hf.get("quantization_config") or {}).get("weight_block_size") or [128, 128]
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"Unsupported value in {config_json}: `quantization_config.weight_block_size` = {block!r}. "
                          "Valid: two positive integers, e.g. [128, 128].")
    source = SafetensorsDir(src, fp8_block=tuple(block))
    tied = bool(hf.get("tie_word_embeddings", False))
    expected = expected_state(cfg)
    state, notes = from_hf(source, cfg, expected, tied_embeddings=tied, init_missing_mtp=(mtp == "auto"),
                           ignore_mtp_layers=(mtp == "drop"))
    model = model_from_state(cfg, state)

    dst.mkdir(parents=True, exist_ok=True)
    # A model-only checkpoint in the one format of every layout: any layout resumes it, its optimizer fresh.
    path = store.save(0, model_entries(model), {"step": 0, "tokens": 0, "sequences": 0, "has_optimizer": False,
                                                 "imported_from": str(src.resolve())})
    (dst / "config.yaml").write_text(to_yaml(config))
    model_dir = dst / MODEL_CONF_DIR / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    model_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    (model_dir / f"{name}.yaml").write_text(f"# Imported from {src.resolve()} by `python -m moetron.hf import`.\n"
                                            + model_yaml)
    if why:
        notes.append(why)
    command = " ".join(["python -m moetron.train", f"--config-dir {dst / MODEL_CONF_DIR}", f"model={name}",
                        f"run.dir={dst}", *overrides])
    return Report(src, dst, [str(path.relative_to(dst)), "config.yaml", f"{MODEL_CONF_DIR}/model/{name}.yaml"],
                  notes, command)
