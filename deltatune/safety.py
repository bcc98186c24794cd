"""Untrusted folders are data, never code: the checks every model, run, delta and checkpoint folder passes.

- `check_model_folder`: refuse model folders that would make transformers import or fetch code (`auto_map`,
  hub attention / experts kernels, `custom_generate/`) unless remote code was allowed by the caller, and folders
  whose weights are pickles only.
- `inside`: a file name read from a JSON file must stay inside that JSON file's folder.
- `load_yaml`: YAML without duplicate keys and with bounded alias expansion (no billion-laughs).
- `check_safetensors_header`: a safetensors header of a sane size before safetensors parses it.
- `fullmatch`: regular expressions from configs and saved deltas cannot hang (catastrophic backtracking).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import regex
import yaml

from deltatune.errors import CheckpointError, ConfigError, DeltaTuneError

REMOTE_CODE_FLAG = "--trust-remote-code"
# Attention / MoE-experts implementations transformers ships; anything else ("org/repo", "flash_attention_2"
# with its hub-kernel fallback, ...) may download and run a kernel.
BUILTIN_ATTENTION = {"eager", "sdpa", "flex_attention", "paged|eager"}
BUILTIN_EXPERTS = {"eager", "batched_mm", "grouped_mm"}
CODE_KEYS = {"auto_map": None, "attn_implementation": BUILTIN_ATTENTION,
             "_attn_implementation_internal": BUILTIN_ATTENTION, "_attn_implementation": BUILTIN_ATTENTION,
             "experts_implementation": BUILTIN_EXPERTS, "_experts_implementation_internal": BUILTIN_EXPERTS,
             "custom_pipelines": None}
# The JSON files transformers reads from a model folder (model, tokenizer, generation, processors).
MODEL_JSON_FILES = ("config.json", "tokenizer_config.json", "generation_config.json", "processor_config.json",
                    "preprocessor_config.json", "feature_extractor_config.json", "special_tokens_map.json")
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
MAX_JSON_BYTES = 64 << 20  # JSON files in a folder (configs, checksums, results) are kilobytes; a hostile one is not
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit for the JSON header
MAX_PARAMS_PER_BYTE = 8  # parameters a model may have per byte of its weight files (see check_declared_size)
NEW_PARAMS_ALLOWED = 50_000_000  # parameters a folder may lack (a new task head, untied embeddings of a small model)
PATTERN_SECONDS = 1.0  # one name against one pattern takes microseconds; only catastrophic backtracking takes this long
MAX_YAML_BYTES = 10 << 20
MAX_YAML_NODES = 100_000  # values in a YAML file with its aliases expanded; real configs have hundreds


def check_model_folder(folder: Path, *, trust_remote_code: bool = False) -> None:
    """Refuse a model folder whose files would make transformers run or download code (unless the caller allowed
    remote code) or unpickle weights (always)."""
    check_regular_files(folder)
    check_weights(folder)
    if trust_remote_code:
        return
    if (folder / "custom_generate").is_dir():
        _refuse(folder / "custom_generate", "custom_generate/", "a generate() function written in Python")
    for name in MODEL_JSON_FILES:
        file = folder / name
        if file.is_file():
            for key_path, value in _code_settings(_read_json_or_none(file)):
                _refuse(file, key_path, repr(value)[:120])


def check_regular_files(folder: Path) -> None:
    """Every entry of a model folder must be a file or folder (symlinks to them are fine, as in the Hugging Face
    cache); a device or pipe (e.g. a config.json linked to /dev/zero) would make a reader hang."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.exists() and not (entry.is_file() or entry.is_dir()):
            raise ConfigError(f"{entry} is not a regular file (a device, pipe or socket); a model folder holds files")


def check_weights(folder: Path) -> None:
    """Weights must be safetensors inside the folder: a folder with only pickled weights (.bin/.pt/.ckpt) is refused,
    never loaded; a shard index may name only files in the folder; every header has a sane size."""
    if not folder.is_dir():
        return
    for index in folder.glob("*.safetensors.index.json"):
        data = _read_json_or_none(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        for shard in set(weight_map.values()) if isinstance(weight_map, dict) else ():
            inside(folder, shard, f"{index}: weight_map")
    tensors = list(folder.glob("*.safetensors"))
    for file in tensors:
        check_safetensors_header(file)
    if tensors:
        check_declared_size(folder / "config.json", sum(f.stat().st_size for f in tensors))
        return
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
    if pickles:
        raise ConfigError(
            f"{folder}: the weights are pickle files only ({', '.join(pickles[:3])}); deltatune loads safetensors "
            "only, because unpickling runs code. Convert them once where you trust the file: "
            "AutoModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)")


def check_declared_size(config_file: Path, stored: int) -> None:
    """The model a config.json describes must not be far larger than its `stored` weight bytes: transformers
    allocates what the config says (a vocab_size of 10**10 is 100s of GB) before it reads a single weight. The
    estimate is a lower bound (embeddings, and per layer two hidden x hidden and two hidden x intermediate
    matrices); up to 8 parameters per stored byte pass (1-byte weights, a new head, untied embeddings)."""
    data = _read_json_or_none(config_file) if config_file.is_file() else None
    configs = [data, *[v for v in data.values() if isinstance(v, dict)]] if isinstance(data, dict) else []
    params = max((_lower_bound_params(c) for c in configs), default=0)
    if params > MAX_PARAMS_PER_BYTE * stored + NEW_PARAMS_ALLOWED:
        raise ConfigError(f"{config_file} describes a model of at least {params:,} parameters, but its weight files "
                          f"hold only {stored:,} bytes; loading would allocate memory for weights that do not exist "
                          "(were vocab_size, hidden_size or the layer count changed?); use the config.json the "
                          "weights were saved with")


def _lower_bound_params(config: dict) -> int:
    def size(*keys: str) -> int:
        value = next((config[k] for k in keys if k in config), 0)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    hidden, inner = size("hidden_size", "n_embd", "d_model", "dim"), size("intermediate_size", "n_inner", "d_ff")
    layers = size("num_hidden_layers", "n_layer", "num_layers", "n_layers")
    return size("vocab_size") * hidden + layers * (2 * hidden * hidden + 2 * hidden * inner)


def read_json(path: str | Path, error: type[DeltaTuneError] = CheckpointError) -> Any:
    """The data of a small JSON file (configs, checksums, results); one larger than any such file is `error`."""
    path = Path(path)
    if (size := path.stat().st_size) > MAX_JSON_BYTES:
        raise error(f"{path} is {size:,} bytes, too large for a JSON file deltatune reads (at most {MAX_JSON_BYTES:,}; "
                    "configs, checksums and results are kilobytes): the folder is damaged or hostile")
    return json.loads(path.read_text(encoding="utf-8"))


def _read_json_or_none(file: Path) -> Any:
    """The data of a model folder's JSON file; None if it is not JSON (transformers then reports it)."""
    try:
        return read_json(file, ConfigError)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def _code_settings(node: Any, path: str = "") -> list[tuple[str, Any]]:
    """(key path, value) of every setting in a JSON tree that names code to import or a kernel to fetch."""
    found: list[tuple[str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}{key}"
            allowed = CODE_KEYS.get(key, ...) if isinstance(key, str) else ...
            if allowed is not ... and value is not None and (allowed is None or not _all_builtin(value, allowed)):
                found.append((where, value))
            found += _code_settings(value, where + ".")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _code_settings(value, f"{path}{i}.")
    return found


def _all_builtin(value: Any, allowed: set[str]) -> bool:
    values = value.values() if isinstance(value, dict) else [value]  # per-sub-config settings
    return all(v is None or v in allowed for v in values)


def _refuse(file: Path, key: str, value: str) -> None:
    raise ConfigError(f"{file}: {key} = {value} would make transformers import or download code; deltatune "
                      f"refuses it unless you pass {REMOTE_CODE_FLAG} (only for a model you trust), "
                      "or remove that setting from the file")


def inside(folder: Path, name: Any, where: str) -> Path:
    """`folder / name` for a file `name` read from the JSON file `where`; CheckpointError if it is not a plain
    relative name or resolves (following symlinks) outside `folder`."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointError(f"{where}: entry {name!r} is not a file name")
    path = folder / name
    if Path(name).is_absolute() or ".." in Path(name).parts or not _contained(folder, path):
        raise CheckpointError(f"{where}: entry {name!r} points outside its folder {folder}; only files inside "
                              "the folder may be named (the file was edited or is hostile)")
    return path


def _contained(folder: Path, path: Path) -> bool:
    root = folder.resolve()
    return path.resolve().is_relative_to(root)


def fullmatch(pattern: str, text: str) -> bool:
    """`re.fullmatch(pattern, text)` that cannot hang: patterns come from configs and saved deltas (untrusted), and a
    nested repetition such as `(.*)*x` backtracks exponentially; that is a ConfigError after PATTERN_SECONDS."""
    try:
        return regex.fullmatch(pattern, text, timeout=PATTERN_SECONDS) is not None
    except TimeoutError:
        raise ConfigError(f"pattern {pattern!r} took over {PATTERN_SECONDS:g}s to match {text!r} (nested "
                          "repetition such as (a+)+ backtracks exponentially); simplify it") from None
    except regex.error as exc:
        raise ConfigError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from None


def check_safetensors_header(path: Path) -> None:
    """The 8-byte header length of a safetensors file must fit the file and a sane cap, before any parsing."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
    if length is None or length > min(size - 8, MAX_HEADER_BYTES):
        stated = "no header length" if length is None else f"a header of {length:,} bytes"
        raise CheckpointError(f"{path} is not a valid safetensors file: it states {stated} in a {size:,}-byte "
                              "file; the file is damaged or hostile, restore or re-save it")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (naming key and line)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges; its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # SafeLoader itself reports unhashable keys
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"line {line}: duplicate key {key!r} (first on line {seen[key]}); "
                                  "a key may appear once per section: remove one of them")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml_file(path: Path) -> Any:
    """The data of a YAML file (see load_yaml); a file too large to be a config, or not UTF-8, is a ConfigError."""
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{path} is {path.stat().st_size:,} bytes, too large for a config "
                          f"(at most {MAX_YAML_BYTES:,})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start}); give a YAML "
                          "config") from None
    return load_yaml(text, where=str(path))


def load_yaml(text: str, where: str) -> Any:
    """Parse YAML safely: plain data only, no duplicate keys, aliases expanding to at most MAX_YAML_NODES nodes.
    Anything else is one ConfigError naming `where`."""
    loader = _StrictLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _check_expanded_size(root)
        return loader.construct_document(root)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{where}: the YAML is nested too deeply to be a config") from None
    finally:
        loader.dispose()


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the nodes the document has once every alias is expanded (each shared node counted per use, computed
    once per node): a few aliases nested in each other ('billion laughs') would expand to billions."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in active:
            raise ConfigError(f"line {node.start_mark.line + 1}: a YAML alias refers to a node that contains it "
                              "(an endless structure); write the values out")
        active.add(id(node))
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else
                    node.value if isinstance(node, yaml.SequenceNode) else [])
        total = 1 + sum(size(child) for child in children)
        active.discard(id(node))
        sizes[id(node)] = total
        if total > MAX_YAML_NODES:
            raise ConfigError(f"line {node.start_mark.line + 1}: the YAML expands to more than {MAX_YAML_NODES:,} "
                              "values through its aliases (*name); a config is far smaller (a 'billion laughs' "
                              "file?); write the values out")
        return total

    size(root)
