"""A sentencepiece tokenizer trained on a task's corpus, saved for ``transformers``.

:func:`train_tokenizer` trains a sentencepiece BPE model on the task's texts and
writes, into a model directory:

- ``tokenizer.model``: the sentencepiece model itself (for sentencepiece users);
- ``tokenizer.json`` / ``tokenizer_config.json``: the same tokenizer for the
  ``tokenizers`` library, so ``transformers.AutoTokenizer.from_pretrained(dir)`` loads
  it (and vLLM, which loads tokenizers through transformers), with a ChatML chat
  template.

Token ids (fixed, so configs can rely on them)::

    0 <|endoftext|>   pad (and the end-of-text marker)
    1 <|im_start|>    starts every chat message
    2 <|im_end|>      ends every chat message: the eos token of generation
    3 <unk>           characters outside the training corpus

Normalisation is the identity and there is no dummy-prefix space, so for any text made
of the corpus' characters ``decode(encode(text)) == text`` and the ``tokenizers`` ids
equal sentencepiece's. Digits are always single tokens (``split_digits``), so each
digit of an answer is one sampling decision. ``user_symbols`` (role names, newline,
task markers such as ``\\boxed{``) are whole tokens wherever they occur.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD, BOS, EOS, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

# ChatML, as Qwen2 uses it: <|im_start|>role\ncontent<|im_end|>\n per message.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# ChatML without role names and newlines: a user (or system) turn is
# <|im_start|>content<|im_end|>, an assistant turn content<|im_end|> right after it, so
# the turns stay unambiguous (only the others open with <|im_start|>) and a prompt
# costs two tokens of markup instead of nine.
COMPACT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}{{- message['content'] + '<|im_end|>' }}"
    "{%- else %}{{- '<|im_start|>' + message['content'] + '<|im_end|>' }}{%- endif %}"
    "{%- endfor %}"
)
CHAT_TEMPLATES = {"chatml": CHAT_TEMPLATE, "compact": COMPACT_CHAT_TEMPLATE}
CHAT_SYMBOLS = ("\n", "system", "user", "assistant")
# Qwen2's pre-tokenizer split (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPM_FILE = "tokenizer.model"


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int,
    user_symbols: Sequence[str] = (),
    model_max_length: int = 512,
    chat_template: str = "chatml",
):
    """Train a sentencepiece BPE tokenizer on ``texts`` and save it into ``out_dir``.

    Args:
        texts: the training corpus, one text per item (weight a text by repeating it).
        out_dir: the model directory (created if missing); tokenizer files are
            (over)written, nothing else is touched.
        vocab_size: target vocabulary size, special tokens included (the result may be
            smaller if the corpus has fewer distinct merges).
        user_symbols: strings that are always one token, in addition to the chat
            symbols.
        model_max_length: the longest sequence the model takes.
        chat_template: a name in :data:`CHAT_TEMPLATES` (``chatml`` or ``compact``).
    Returns:
        the loaded ``transformers`` tokenizer.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    symbols = list(dict.fromkeys([*user_symbols, *CHAT_SYMBOLS]))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        split_digits=True,
        byte_fallback=False,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        user_defined_symbols=symbols,
        pad_id=PAD_ID,
        pad_piece=PAD,
        bos_id=BOS_ID,
        bos_piece=BOS,
        eos_id=EOS_ID,
        eos_piece=EOS,
        unk_id=UNK_ID,
        unk_piece=UNK,
        num_threads=1,
        minloglevel=2,
    )
    (out / SPM_FILE).write_bytes(model.getvalue())
    tokenizer = hf_tokenizer_from_spm(
        out / SPM_FILE, model_max_length=model_max_length, chat_template=chat_template
    )
    tokenizer.save_pretrained(out)
    return load_task_tokenizer(out)


def hf_tokenizer_from_spm(
    spm_file: str | os.PathLike, *, model_max_length: int = 512, chat_template: str = "chatml"
):
    """The ``transformers`` tokenizer equivalent to a sentencepiece BPE model, with the
    chat template named ``chat_template`` (:data:`CHAT_TEMPLATES`).

    The pieces are stored in the byte-level form of Qwen2's tokenizer (a space is
    ``Ġ`` rather than sentencepiece's ``▁``) with Qwen2's pre-tokenizer and decoder,
    because ``AutoTokenizer`` loads the tokenizer of a directory whose ``config.json``
    says ``qwen2`` as ``Qwen2Tokenizer``, which keeps the vocabulary and merges of
    ``tokenizer.json`` but installs its own pre-tokenizer: in this form both loaders
    give sentencepiece's ids. BPE merges are rebuilt from the piece order
    (sentencepiece numbers BPE pieces in merge order); user-defined symbols and the
    special tokens become added tokens, matched before BPE runs, as in sentencepiece.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    if chat_template not in CHAT_TEMPLATES:
        raise ValueError(
            f"chat_template={chat_template!r}: expected one of {sorted(CHAT_TEMPLATES)}"
        )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(spm_file).read_bytes())
    kinds = proto.SentencePiece.Type
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise ValueError(f"{spm_file}: expected a sentencepiece BPE model")
    pieces = [p.piece for p in proto.pieces]
    types = [p.type for p in proto.pieces]
    expected = {PAD_ID: PAD, BOS_ID: BOS, EOS_ID: EOS, UNK_ID: UNK}
    for i, piece in expected.items():
        if pieces[i] != piece:
            raise ValueError(f"{spm_file}: piece {i} is {pieces[i]!r}, expected {piece!r}")
    # Normal pieces in byte-level form; specials and user symbols stay as they are
    # (added tokens, matched on the raw text).
    forms = [_byte_level(p) if t == kinds.NORMAL else p for p, t in zip(pieces, types, strict=True)]
    vocab = {f: i for i, f in enumerate(forms)}
    normal = [f for f, t in zip(forms, types, strict=True) if t == kinds.NORMAL]
    merges = _bpe_merges(normal, vocab)
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    specials = [PAD, BOS, EOS, UNK]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    users = [p for p, t in zip(pieces, types, strict=True) if t == kinds.USER_DEFINED]
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in users])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        bos_token=None,
        chat_template=CHAT_TEMPLATES[chat_template],
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def load_task_tokenizer(model_dir: str | os.PathLike):
    """The built-in tasks' tokenizer saved in ``model_dir`` by :func:`train_tokenizer`
    (or any tokenizer there), through ``transformers.AutoTokenizer``, unchecked: the
    task builders use it on directories they wrote."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _bpe_merges(pieces: Sequence[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges that rebuild each multi-character piece, ranked by the piece's id (its
    merge step), ties by the ids of the two halves."""
    ranked = []
    for piece in pieces:
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                ranked.append((vocab[piece], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table of byte-level BPE (``Ġ`` for a space)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_CHARS = _byte_chars()


def _byte_level(piece: str) -> str:
    """A sentencepiece piece (``▁`` for a space) in byte-level form."""
    return "".join(_BYTE_CHARS[b] for b in piece.replace("\u2581", " ").encode("utf-8"))
