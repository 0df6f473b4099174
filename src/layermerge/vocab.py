"""The output vocabulary when experts added tokens: the union of their tokenizers, or one input's.

Experts fine-tuned for chat or tools often add tokens (``<|im_start|>``, ``<tool_call>``) and grow
their embedding. ``vocab_policy: base`` merges the rows the base has and drops the rest. ``union``
keeps every expert's added tokens: the output tokenizer is the base's plus each added token once (in
the order of the experts, then of their ids), and the row of an added token is its expert's row, the
mean over the experts that have it when several do. ``tokenizer_source: NAME`` makes one input's
tokenizer the output's instead (the base's, or an expert's, whose added tokens get rows the same way).
Rows of the base's tokens are merged by the method exactly as under ``base``, for the input embedding
and an untied output head alike. ``chat_template: NAME`` copies that input's chat template into the
output tokenizer.

An expert's tokenizer must extend the base's: every base token keeps its id. A tokenizer trained
afresh is refused (its rows have no counterpart in the base to merge with).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from layermerge.errors import IncompatibleExpertsError


@dataclass
class OutputVocabulary:
    """What the output's token rows are: the base's rows (merged), then rows of added tokens."""

    tokenizer: object                               # the output tokenizer (transformers)
    base_tokens: int                                # tokens of the base tokenizer (ids below it: merged)
    size: int                                       # rows of the output embedding
    added: dict[int, list[tuple[int, int]]] = field(default_factory=dict)   # output id -> [(expert, its row)]
    source: str = "union"
    unknown_id: int = 0                             # where an expert's token the output lacks goes

    def output_ids(self, position: int, input_ids: torch.Tensor) -> torch.Tensor:
        """Expert ``position``'s token ids (from its own tokenizer) as ids of the output vocabulary: the base's
        tokens keep theirs, its added tokens get their output ids, tokens the output lacks its unknown id."""
        moved = {row: token for token, owners in self.added.items() for owner, row in owners if owner == position}
        out = input_ids.clone()
        beyond = input_ids >= self.base_tokens
        if beyond.any():
            mapped = [moved.get(int(i), self.unknown_id) for i in input_ids[beyond].tolist()]
            out[beyond] = torch.tensor(mapped, dtype=input_ids.dtype)
        return out

    def view(self, rows: torch.Tensor, means: torch.Tensor, position: int | None = None,
             expert: torch.Tensor | None = None) -> torch.Tensor:
        """A vocabulary tensor in the output's rows, for the block engine: ``rows`` (the base's, or an expert's
        first ``len(rows)`` rows) for the base's tokens, then each added token's row: expert ``position``'s own
        (from its whole tensor ``expert``) where it has the token, else the mean over the experts that have it
        (``means``: ``extend`` of an empty tensor). Task Arithmetic over these views gives every added token
        exactly that mean, as the output has it."""
        out = means.clone().to(rows.dtype)
        keep = min(len(rows), self.size)
        out[:keep] = rows[:keep]
        added = list(self.added)
        if added:
            out[added] = means[added].to(rows.dtype)
        if position is not None and expert is not None:
            own = [(token, row) for token, owners in self.added.items() for owner, row in owners if owner == position]
            if own:
                out[[token for token, _ in own]] = expert[[row for _, row in own]].to(rows.dtype)
        return out

    def extend(self, merged: torch.Tensor, expert_rows) -> torch.Tensor:
        """``merged`` (the base's rows, merged) grown to ``size`` rows: each added token's row is the mean of
        the rows its experts have (``expert_rows(position, rows) -> tensor``: those rows of that expert)."""
        out = torch.zeros((self.size, *merged.shape[1:]), dtype=merged.dtype)
        keep = min(len(merged), self.size)
        out[:keep] = merged[:keep]
        by_expert: dict[int, list[tuple[int, int]]] = {}
        for token, owners in self.added.items():
            for position, row in owners:
                by_expert.setdefault(position, []).append((token, row))
        total = torch.zeros((self.size, *merged.shape[1:]), dtype=torch.float32)
        counts = torch.zeros(self.size, dtype=torch.float32)
        for position, pairs in by_expert.items():
            rows = expert_rows(position, [row for _, row in pairs]).float()
            for (token, _), values in zip(pairs, rows):
                total[token] += values
                counts[token] += 1
        filled = counts > 0
        out[filled] = (total[filled] / counts[filled].reshape(-1, *([1] * (merged.dim() - 1)))).to(merged.dtype)
        return out

    def write(self, folder: Path, config: dict | None) -> dict | None:
        """Save the output tokenizer into ``folder`` and return the config with the new vocab_size."""
        self.tokenizer.save_pretrained(folder)
        return self.config(config)

    def config(self, config: dict | None) -> dict | None:
        """A model config with this vocabulary's size (in ``text_config`` where the model keeps it there)."""
        if config is None:
            return None
        config = dict(config)
        if isinstance(config.get("text_config"), dict) and "vocab_size" in config["text_config"]:
            config["text_config"] = {**config["text_config"], "vocab_size": self.size}
        else:
            config["vocab_size"] = self.size
        return config


def load_input_tokenizer(reader, role: str, base_reader=None):
    """An input's tokenizer. An expert whose folder holds none (a LoRA adapter saved without one, usually)
    and whose vocabulary is the base's size has the base's tokenizer: it added no tokens."""
    from layermerge.data.models import TOKENIZER_FILES, load_tokenizer

    folder = reader.folder if reader.folder is not None else reader.path.parent
    if base_reader is not None and not any((folder / name).is_file() for name in TOKENIZER_FILES) \
            and _embedding_rows(reader) == _embedding_rows(base_reader):
        folder = base_reader.folder if base_reader.folder is not None else base_reader.path.parent
    return load_tokenizer(folder, hint=f"save the tokenizer of {role} beside its weights")


def plan_vocabulary(base_reader, experts: list[tuple[str, object]], policy: str, tokenizer_source: str | None,
                    chat_template: str | None, base_rows: int) -> OutputVocabulary | None:
    """The output vocabulary for these inputs, or None when the base's tokenizer is kept unchanged.

    ``experts``: (name, reader) in order; ``base_rows``: rows of the base's embedding."""
    if policy != "union" and tokenizer_source in (None, "base") and chat_template is None:
        return None
    if base_reader is None:
        raise IncompatibleExpertsError("vocab_policy union, tokenizer_source and chat_template need a base model "
                                       "(its tokenizer is what the experts' tokenizers extend)")
    names = [name for name, _ in experts]
    for option, value in (("tokenizer_source", tokenizer_source), ("chat_template", chat_template)):
        if value is not None and value not in ("base", "union", *names) or (option == "chat_template"
                                                                               and value == "union"):
            allowed = ", ".join(["base", *names] + (["union"] if option == "tokenizer_source" else []))
            raise IncompatibleExpertsError(f"{option}: {value!r} is not an input; choose one of {allowed}")
    base_tokenizer = load_input_tokenizer(base_reader, "the base model")
    tokenizers = {name: load_input_tokenizer(reader, f"expert '{name}'", base_reader) for name, reader in experts}
    base_vocab = base_tokenizer.get_vocab()
    added_by_expert = {}
    for name, _ in experts:
        vocab = tokenizers[name].get_vocab()
        moved = [token for token, index in base_vocab.items() if vocab.get(token) != index]
        if moved:
            token = moved[0]
            raise IncompatibleExpertsError(
                f"expert '{name}' has a tokenizer that does not extend the base's: token {token!r} has id "
                f"{base_vocab[token]} in the base and {vocab.get(token)} in the expert ({len(moved)} such tokens). "
                "Only tokens added on top of the base's tokenizer can be merged; use vocab_policy: base or "
                "re-train the expert with the base's tokenizer")
        added_by_expert[name] = sorted(((index, token) for token, index in vocab.items() if token not in base_vocab))
    if policy == "union" or tokenizer_source == "union":
        chosen = [token for name in names for _, token in added_by_expert[name]]
        source = "union"
    elif tokenizer_source in names:
        chosen = [token for _, token in added_by_expert[tokenizer_source]]
        source = tokenizer_source
    else:
        chosen, source = [], "base"
    output = _output_tokenizer(base_tokenizer, tokenizers, dict.fromkeys(chosen))
    template_from = chat_template or (tokenizer_source if tokenizer_source in names else None)
    if template_from is not None:
        template = (base_tokenizer if template_from == "base" else tokenizers[template_from]).chat_template
        if template is None and chat_template is not None:
            raise IncompatibleExpertsError(f"chat_template: {template_from!r} has no chat template in its tokenizer")
        output.chat_template = template
    out_vocab = output.get_vocab()
    added: dict[int, list[tuple[int, int]]] = {}
    for position, name in enumerate(names):
        rows = _embedding_rows(experts[position][1])
        for index, token in added_by_expert[name]:
            if token in out_vocab and out_vocab[token] >= len(base_vocab):
                if rows is not None and index >= rows:
                    raise IncompatibleExpertsError(
                        f"expert '{name}': token {token!r} has id {index} but its embedding has {rows} rows; "
                        "resize the embedding to the tokenizer (model.resize_token_embeddings(len(tokenizer)))")
                added.setdefault(out_vocab[token], []).append((position, index))
    size = max(base_rows, max(out_vocab.values(), default=-1) + 1)
    unknown = output.unk_token_id if output.unk_token_id is not None else (output.pad_token_id or 0)
    return OutputVocabulary(output, len(base_vocab), size, added, source, int(unknown))


def _output_tokenizer(base_tokenizer, tokenizers: dict, tokens: dict):
    """The base's tokenizer with ``tokens`` added in order (special tokens stay special)."""
    from copy import deepcopy

    from tokenizers import AddedToken

    output = deepcopy(base_tokenizer)
    specials = {}
    for tokenizer in tokenizers.values():
        for token in tokenizer.all_special_tokens:
            specials[token] = True
        for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
            if added.content in tokens:
                specials[added.content] = specials.get(added.content, False) or added.special
    for token in tokens:
        output.add_tokens([AddedToken(token, special=specials.get(token, False), normalized=False)],
                          special_tokens=specials.get(token, False))
    return output


def _embedding_rows(reader) -> int | None:
    config = reader.config or {}
    return config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
