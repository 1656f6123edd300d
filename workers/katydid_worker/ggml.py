"""Convert a CTranslate2 Whisper model to a whisper.cpp ggml file, numpy only.

The ggml layout is the one whisper.cpp's ``convert-pt-to-ggml.py`` writes:

    i32 magic 'ggml' | 11 x i32 hparams (vocab, audio ctx/state/head/layer, text ctx/state/head/layer,
    mels, ftype) | i32 n_mel, i32 n_fft, f32 filters[n_mel][n_fft] | i32 n_tokens, n_tokens x
    (i32 len, bytes) | tensors: i32 rank, i32 name_len, i32 ftype, rank x i32 dim (innermost first),
    name, data

Rule 1: the key projections of Whisper's attention have no bias. CTranslate2 fuses q/k/v (and
the cross-attention k/v) into one matrix and stores zeros for the key bias; whisper.cpp refuses a
file that carries a tensor it does not know, so the key bias is dropped, never written.

Rule 2: only the ordinary GPT-2 byte tokens are written; whisper.cpp adds the special ones itself
from ``n_vocab``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from katydid.audio import SAMPLE_RATE
from katydid.errors import ModelError
from katydid_worker.ct2 import Ct2Model, iter_layers

GGML_MAGIC = 0x67676D6C
N_FFT = 400


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    # Slaney's auditory toolbox scale (librosa's default, htk=False): linear below 1 kHz, log above.
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    mels = freq / f_sp
    high = freq >= min_log_hz
    mels[high] = min_log_mel + np.log(freq[high] / min_log_hz) / logstep
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    freqs = f_sp * mels
    high = mels >= min_log_mel
    freqs[high] = min_log_hz * np.exp(logstep * (mels[high] - min_log_mel))
    return freqs


def mel_filters(n_mels: int = 80, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """The slaney-normalised mel filter bank Whisper uses (= ``librosa.filters.mel``).

    Returns:
        float32 array of shape ``(n_mels, n_fft // 2 + 1)``.
    """
    fft_freqs = np.linspace(0.0, sample_rate / 2, 1 + n_fft // 2)
    mel_pts = np.linspace(
        _hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([sample_rate / 2]))[0], n_mels + 2
    )
    mel_f = _mel_to_hz(mel_pts)
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)
    weights = np.zeros((n_mels, len(fft_freqs)))
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0.0, np.minimum(lower, upper))
    enorm = 2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels])
    weights *= enorm[:, np.newaxis]
    return weights.astype(np.float32)


def _byte_decoder() -> dict[str, int]:
    # GPT-2 maps each byte to a printable code point; invert that map to recover raw token bytes.
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def read_tokens(model_dir: Path) -> list[bytes]:
    """The ordinary (non-special) tokens of a Whisper tokenizer as raw bytes, in id order.

    Args:
        model_dir: a CTranslate2 model directory holding ``tokenizer.json``.

    Raises:
        ModelError: the tokenizer is missing or malformed.
    """
    path = model_dir / "tokenizer.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab: dict[str, int] = data["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"cannot read tokenizer {path}: {exc}") from exc
    eot = vocab.get("<|endoftext|>")
    if eot is None:
        specials = [
            t["id"] for t in data.get("added_tokens", []) if t.get("content") == "<|endoftext|>"
        ]
        if not specials:
            raise ModelError(f"tokenizer {path} has no <|endoftext|> token")
        eot = specials[0]
    by_id = sorted((i, tok) for tok, i in vocab.items() if i < eot)
    if [i for i, _ in by_id] != list(range(eot)):
        raise ModelError(f"tokenizer {path} has gaps below id {eot}")
    decoder = _byte_decoder()
    try:
        return [bytes(decoder[ch] for ch in tok) for _, tok in by_id]
    except KeyError as exc:
        raise ModelError(f"tokenizer {path} holds a token outside GPT-2's byte alphabet") from exc


def _attention(
    model: Ct2Model, src: str, dst: str, fused_qkv: bool
) -> Iterator[tuple[str, np.ndarray]]:
    yield f"{dst}_ln.weight", model[f"{src}/layer_norm/gamma"]
    yield f"{dst}_ln.bias", model[f"{src}/layer_norm/beta"]
    if fused_qkv:
        q_w, k_w, v_w = np.split(model[f"{src}/linear_0/weight"], 3)
        q_b, _k_b, v_b = np.split(model[f"{src}/linear_0/bias"], 3)
        out = "linear_1"
    else:  # cross attention: the query alone, then fused k/v computed from the encoder output
        q_w, q_b = model[f"{src}/linear_0/weight"], model[f"{src}/linear_0/bias"]
        k_w, v_w = np.split(model[f"{src}/linear_1/weight"], 2)
        _k_b, v_b = np.split(model[f"{src}/linear_1/bias"], 2)
        out = "linear_2"
    yield f"{dst}.query.weight", q_w
    yield f"{dst}.query.bias", q_b
    yield f"{dst}.key.weight", k_w
    yield f"{dst}.value.weight", v_w
    yield f"{dst}.value.bias", v_b
    yield f"{dst}.out.weight", model[f"{src}/{out}/weight"]
    yield f"{dst}.out.bias", model[f"{src}/{out}/bias"]


def _mlp(model: Ct2Model, src: str, dst: str) -> Iterator[tuple[str, np.ndarray]]:
    yield f"{dst}.mlp_ln.weight", model[f"{src}/ffn/layer_norm/gamma"]
    yield f"{dst}.mlp_ln.bias", model[f"{src}/ffn/layer_norm/beta"]
    yield f"{dst}.mlp.0.weight", model[f"{src}/ffn/linear_0/weight"]
    yield f"{dst}.mlp.0.bias", model[f"{src}/ffn/linear_0/bias"]
    yield f"{dst}.mlp.2.weight", model[f"{src}/ffn/linear_1/weight"]
    yield f"{dst}.mlp.2.bias", model[f"{src}/ffn/linear_1/bias"]


def whisper_tensors(model: Ct2Model) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(whisper.cpp name, array)`` for every tensor whisper.cpp expects."""
    yield "encoder.positional_embedding", model["encoder/position_encodings/encodings"]
    for conv in ("conv1", "conv2"):
        yield f"encoder.{conv}.weight", model[f"encoder/{conv}/weight"]
        yield f"encoder.{conv}.bias", model[f"encoder/{conv}/bias"].reshape(-1, 1)
    for i in iter_layers(model, "encoder"):
        src, dst = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        yield from _attention(model, f"{src}/self_attention", f"{dst}.attn", fused_qkv=True)
        yield from _mlp(model, src, dst)
    yield "encoder.ln_post.weight", model["encoder/layer_norm/gamma"]
    yield "encoder.ln_post.bias", model["encoder/layer_norm/beta"]
    yield "decoder.positional_embedding", model["decoder/position_encodings/encodings"]
    yield "decoder.token_embedding.weight", model["decoder/embeddings/weight"]
    for i in iter_layers(model, "decoder"):
        src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        yield from _attention(model, f"{src}/self_attention", f"{dst}.attn", fused_qkv=True)
        yield from _attention(model, f"{src}/attention", f"{dst}.cross_attn", fused_qkv=False)
        yield from _mlp(model, src, dst)
    yield "decoder.ln.weight", model["decoder/layer_norm/gamma"]
    yield "decoder.ln.bias", model["decoder/layer_norm/beta"]


def hparams(model: Ct2Model) -> dict[str, int]:
    """whisper.cpp's hyper-parameters, derived from the tensor shapes."""
    enc_pos = model["encoder/position_encodings/encodings"]
    dec_pos = model["decoder/position_encodings/encodings"]
    return {
        "n_vocab": int(model["decoder/embeddings/weight"].shape[0]),
        "n_audio_ctx": int(enc_pos.shape[0]),
        "n_audio_state": int(enc_pos.shape[1]),
        "n_audio_head": int(model["encoder/num_heads"]),
        "n_audio_layer": len(list(iter_layers(model, "encoder"))),
        "n_text_ctx": int(dec_pos.shape[0]),
        "n_text_state": int(dec_pos.shape[1]),
        "n_text_head": int(model["decoder/num_heads"]),
        "n_text_layer": len(list(iter_layers(model, "decoder"))),
        "n_mels": int(model["encoder/conv1/weight"].shape[1]),
    }


def _keeps_f32(name: str, arr: np.ndarray) -> bool:
    # whisper.cpp holds biases, norms and positional embeddings in f32 and matrices in f16.
    return arr.ndim < 2 or name.endswith(("conv1.bias", "conv2.bias", "positional_embedding"))


# ggml tensor types and file types (ggml.h), and whisper.cpp's quantisation version marker.
GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q4_0, GGML_TYPE_Q8_0 = 0, 1, 2, 8
FTYPE_F16, FTYPE_Q4_0, FTYPE_Q8_0 = 1, 2, 7
GGML_QNT_VERSION, GGML_QNT_VERSION_FACTOR = 2, 1000
QK = 32  # values per block, for both quantisations


def _blocks(arr: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(arr, dtype=np.float32)
    if x.shape[-1] % QK:
        raise ModelError(
            f"cannot quantise a tensor whose rows ({x.shape[-1]}) are not a multiple of {QK}"
        )
    return x.reshape(-1, QK)


def _inverse(d: np.ndarray) -> np.ndarray:
    inv: np.ndarray = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    return inv


def quantize_q8_0(arr: np.ndarray) -> bytes:
    """ggml's Q8_0: blocks of 32 values along the last axis, an f16 scale then 32 int8
    (value = q * d, d = max|x| / 127).

    Raises:
        ModelError: the last axis is not a multiple of 32.
    """
    blocks = _blocks(arr)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127.0
    qs = np.rint(blocks * _inverse(d)).clip(-127, 127).astype(np.int8)
    packed = np.empty(blocks.shape[0], dtype=[("d", "<f2"), ("qs", "i1", QK)])
    packed["d"] = d[:, 0].astype("<f2")
    packed["qs"] = qs
    return packed.tobytes()


def quantize_q4_0(arr: np.ndarray) -> bytes:
    """ggml's Q4_0: blocks of 32 values, an f16 scale then 16 bytes of 4-bit codes
    (value = (q - 8) * d, d = -x_m / 8 where x_m is the value of largest magnitude; byte j holds
    value j in its low nibble and value j + 16 in its high one), as ggml's reference quantiser.

    Raises:
        ModelError: the last axis is not a multiple of 32.
    """
    blocks = _blocks(arr)
    extreme = blocks[np.arange(blocks.shape[0]), np.abs(blocks).argmax(axis=1)]
    d = (extreme / -8.0)[:, None]
    q = np.minimum(15, np.trunc(blocks * _inverse(d) + 8.5)).astype(np.uint8)
    packed = np.empty(blocks.shape[0], dtype=[("d", "<f2"), ("qs", "u1", QK // 2)])
    packed["d"] = d[:, 0].astype("<f2")
    packed["qs"] = q[:, : QK // 2] | (q[:, QK // 2 :] << 4)
    return packed.tobytes()


@dataclass(frozen=True, slots=True)
class _Quant:
    tensor_type: int
    file_type: int
    pack: Callable[[np.ndarray], bytes]


_QUANTISED = {
    "q8_0": _Quant(GGML_TYPE_Q8_0, FTYPE_Q8_0, quantize_q8_0),
    "q4_0": _Quant(GGML_TYPE_Q4_0, FTYPE_Q4_0, quantize_q4_0),
}
QUANTS = ("f16", *_QUANTISED)


def _tensor_type(name: str, arr: np.ndarray, quant: str) -> int:
    if _keeps_f32(name, arr):
        return GGML_TYPE_F32
    # whisper.cpp quantises 2-D matrices only; the 3-D convolution kernels stay f16.
    if quant in _QUANTISED and arr.ndim == 2:
        return _QUANTISED[quant].tensor_type
    return GGML_TYPE_F16


def write_ggml(model: Ct2Model, tokens: list[bytes], out: BinaryIO, *, quant: str = "f16") -> None:
    """Write ``model`` as a whisper.cpp ggml file, f16 or with Q8_0 or Q4_0 matrices.

    Raises:
        ModelError: the model lacks a tensor whisper.cpp needs, or ``quant`` is unknown.
    """
    if quant not in QUANTS:
        raise ModelError(f"unknown quantisation {quant!r}; known: {', '.join(QUANTS)}")
    hp = hparams(model)
    out.write(struct.pack("<i", GGML_MAGIC))
    out.write(struct.pack("<10i", *hp.values()))
    ftype = (
        FTYPE_F16
        if quant == "f16"
        else GGML_QNT_VERSION * GGML_QNT_VERSION_FACTOR + _QUANTISED[quant].file_type
    )
    out.write(struct.pack("<i", ftype))
    filters = mel_filters(hp["n_mels"])
    out.write(struct.pack("<ii", *filters.shape))
    out.write(filters.astype("<f4").tobytes())
    out.write(struct.pack("<i", len(tokens)))
    for tok in tokens:
        out.write(struct.pack("<i", len(tok)) + tok)
    quantised = _QUANTISED.get(quant)
    for name, value in whisper_tensors(model):
        ttype = _tensor_type(name, value, quant)
        if quantised is not None and ttype == quantised.tensor_type:
            payload = quantised.pack(value)
        else:
            payload = np.ascontiguousarray(
                value, dtype="<f4" if ttype == GGML_TYPE_F32 else "<f2"
            ).tobytes()
        raw_name = name.encode("utf-8")
        out.write(struct.pack("<iii", value.ndim, len(raw_name), ttype))
        out.write(struct.pack(f"<{value.ndim}i", *reversed(value.shape)))
        out.write(raw_name)
        out.write(payload)
