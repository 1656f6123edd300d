"""The CTranslate2 reader and the ggml writer, on a small synthetic Whisper model."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from katydid.errors import ModelError
from katydid_worker.ct2 import read_ct2, write_ct2
from katydid_worker.ggml import (
    GGML_MAGIC,
    mel_filters,
    quantize_q4_0,
    quantize_q8_0,
    read_tokens,
    whisper_tensors,
    write_ggml,
)

D, HEADS, MELS, VOCAB, AUDIO_CTX, TEXT_CTX = (
    32,
    2,
    80,
    300,
    12,
    6,
)  # D: a multiple of 32, to quantise


def _synthetic_whisper(rng: np.random.Generator, layers: int = 2) -> dict[str, np.ndarray]:
    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float16)

    v: dict[str, np.ndarray] = {
        "encoder/num_heads": np.array(HEADS, dtype=np.int16),
        "decoder/num_heads": np.array(HEADS, dtype=np.int16),
        "encoder/conv1/weight": w(D, MELS, 3),
        "encoder/conv1/bias": w(D),
        "encoder/conv2/weight": w(D, D, 3),
        "encoder/conv2/bias": w(D),
        "encoder/position_encodings/encodings": w(AUDIO_CTX, D),
        "encoder/layer_norm/gamma": w(D),
        "encoder/layer_norm/beta": w(D),
        "decoder/embeddings/weight": w(VOCAB, D),
        "decoder/position_encodings/encodings": w(TEXT_CTX, D),
        "decoder/layer_norm/gamma": w(D),
        "decoder/layer_norm/beta": w(D),
    }
    for side in ("encoder", "decoder"):
        for i in range(layers):
            p = f"{side}/layer_{i}"
            blocks = ["self_attention"] + (["attention"] if side == "decoder" else [])
            for blk in blocks:
                v[f"{p}/{blk}/layer_norm/gamma"] = w(D)
                v[f"{p}/{blk}/layer_norm/beta"] = w(D)
            v[f"{p}/self_attention/linear_0/weight"] = w(3 * D, D)
            v[f"{p}/self_attention/linear_0/bias"] = w(3 * D)
            v[f"{p}/self_attention/linear_1/weight"] = w(D, D)
            v[f"{p}/self_attention/linear_1/bias"] = w(D)
            if side == "decoder":
                v[f"{p}/attention/linear_0/weight"] = w(D, D)
                v[f"{p}/attention/linear_0/bias"] = w(D)
                v[f"{p}/attention/linear_1/weight"] = w(2 * D, D)
                v[f"{p}/attention/linear_1/bias"] = w(2 * D)
                v[f"{p}/attention/linear_2/weight"] = w(D, D)
                v[f"{p}/attention/linear_2/bias"] = w(D)
            v[f"{p}/ffn/layer_norm/gamma"] = w(D)
            v[f"{p}/ffn/layer_norm/beta"] = w(D)
            v[f"{p}/ffn/linear_0/weight"] = w(4 * D, D)
            v[f"{p}/ffn/linear_0/bias"] = w(4 * D)
            v[f"{p}/ffn/linear_1/weight"] = w(D, 4 * D)
            v[f"{p}/ffn/linear_1/bias"] = w(D)
    return v


QUANT_BLOCK_BYTES = {8: 34, 2: 18}  # ggml type -> bytes per block of 32 (Q8_0, Q4_0)


def _read_ggml(
    data: bytes,
) -> tuple[list[int], np.ndarray, list[bytes], dict[str, tuple[int, np.ndarray]]]:
    """A minimal ggml reader, independent of the writer, for checking what was written."""
    buf = io.BytesIO(data)

    def i32(n: int = 1) -> list[int]:
        return list(struct.unpack(f"<{n}i", buf.read(4 * n)))

    header = i32(12)
    n_mel, n_fft = i32(2)
    filters = np.frombuffer(buf.read(4 * n_mel * n_fft), dtype="<f4").reshape(n_mel, n_fft)
    tokens = [buf.read(i32()[0]) for _ in range(i32()[0])]
    tensors: dict[str, tuple[int, np.ndarray]] = {}
    while head := buf.read(12):
        n_dims, name_len, ftype = struct.unpack("<iii", head)
        dims = i32(n_dims)
        name = buf.read(name_len).decode()
        count = int(np.prod(dims))
        if ftype in QUANT_BLOCK_BYTES:  # quantised: kept as the raw blocks
            arr = np.frombuffer(buf.read(count // 32 * QUANT_BLOCK_BYTES[ftype]), dtype=np.uint8)
        else:
            dtype = np.dtype("<f4" if ftype == 0 else "<f2")
            arr = np.frombuffer(buf.read(count * dtype.itemsize), dtype=dtype).reshape(dims[::-1])
        tensors[name] = (ftype, arr)
    return header, filters, tokens, tensors


@pytest.fixture
def ct2_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    variables = _synthetic_whisper(rng)
    write_ct2(
        tmp_path / "model.bin",
        "WhisperSpec",
        3,
        variables,
        {"decoder/projection/weight": "decoder/embeddings/weight"},
    )
    vocab = {"!": 0, "Ġthe": 1, "Ċ": 2, "é": 3, "<|endoftext|>": 4, "<|startoftranscript|>": 5}
    (tmp_path / "tokenizer.json").write_text(
        json.dumps({"model": {"vocab": vocab}}), encoding="utf-8"
    )
    return tmp_path


def test_ct2_round_trip(ct2_dir: Path) -> None:
    model = read_ct2(ct2_dir / "model.bin")
    original = _synthetic_whisper(np.random.default_rng(0))
    assert model.spec == "WhisperSpec"
    assert model.revision == 3
    for name, value in original.items():
        np.testing.assert_array_equal(model[name], value)
        assert model[name].dtype == value.dtype
    np.testing.assert_array_equal(
        model["decoder/projection/weight"], original["decoder/embeddings/weight"]
    )


def test_ct2_truncated_file_is_a_model_error(ct2_dir: Path) -> None:
    data = (ct2_dir / "model.bin").read_bytes()
    (ct2_dir / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated"):
        read_ct2(ct2_dir / "model.bin")


def test_ct2_missing_file_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read"):
        read_ct2(tmp_path / "absent.bin")


def test_ggml_layout(ct2_dir: Path) -> None:
    model = read_ct2(ct2_dir / "model.bin")
    out = io.BytesIO()
    write_ggml(model, read_tokens(ct2_dir), out)
    header, filters, tokens, tensors = _read_ggml(out.getvalue())

    assert header == [GGML_MAGIC, VOCAB, AUDIO_CTX, D, HEADS, 2, TEXT_CTX, D, HEADS, 2, MELS, 1]
    assert filters.shape == (MELS, 201)
    # Only the ordinary tokens, as raw bytes: GPT-2's 'Ġ' is a space, 'Ċ' a newline.
    assert tokens == [b"!", b" the", b"\n", "é".encode("latin-1")]
    src = _synthetic_whisper(np.random.default_rng(0))
    # Fused q/k/v are split in order; the key has no bias (whisper.cpp rejects unknown tensors).
    qkv = src["encoder/layer_1/self_attention/linear_0/weight"]
    np.testing.assert_array_equal(tensors["encoder.blocks.1.attn.query.weight"][1], qkv[:D])
    np.testing.assert_array_equal(tensors["encoder.blocks.1.attn.key.weight"][1], qkv[D : 2 * D])
    np.testing.assert_array_equal(tensors["encoder.blocks.1.attn.value.weight"][1], qkv[2 * D :])
    kv = src["decoder/layer_0/attention/linear_1/weight"]
    np.testing.assert_array_equal(tensors["decoder.blocks.0.cross_attn.key.weight"][1], kv[:D])
    np.testing.assert_array_equal(tensors["decoder.blocks.0.cross_attn.value.weight"][1], kv[D:])
    assert not [n for n in tensors if n.endswith("key.bias")]
    # Matrices stay f16; vectors, conv biases and positional embeddings become f32.
    assert tensors["encoder.conv1.weight"][0] == 1
    assert tensors["encoder.conv1.bias"][0] == 0
    assert tensors["encoder.conv1.bias"][1].shape == (D, 1)
    assert tensors["encoder.positional_embedding"][0] == 0
    assert tensors["decoder.ln.weight"][0] == 0
    # Every tensor whisper.cpp expects, once: encoder = positions, 2 convs (w, b), 15 per layer,
    # ln_post; decoder = positions, token embedding, 24 per layer (self + cross + mlp), ln.
    assert len(tensors) == len(list(whisper_tensors(model)))
    assert len(tensors) == (1 + 4 + 15 * 2 + 2) + (2 + 24 * 2 + 2)


def test_convert_rejects_a_model_missing_a_tensor(ct2_dir: Path) -> None:
    variables = _synthetic_whisper(np.random.default_rng(0))
    del variables["decoder/layer_norm/gamma"]
    write_ct2(ct2_dir / "model.bin", "WhisperSpec", 3, variables)
    with pytest.raises(ModelError, match="decoder/layer_norm/gamma"):
        write_ggml(read_ct2(ct2_dir / "model.bin"), [b"a"], io.BytesIO())


def test_mel_filters_shape_and_slaney_normalisation() -> None:
    f = mel_filters(80)
    assert f.shape == (80, 201)
    assert f.dtype == np.float32
    assert (f >= 0).all()
    # Each triangle peaks later than the one before (increasing centre frequencies).
    peaks = f.argmax(axis=1)
    assert (np.diff(peaks) >= 0).all()
    # Slaney normalisation: each filter's area over frequency (Hz) is about 1 when its width is
    # several FFT bins; the narrow low filters are sampled too coarsely for this to hold.
    bin_hz = 8000 / 200
    areas = f.sum(axis=1) * bin_hz
    np.testing.assert_allclose(areas[45:], 1.0, rtol=0.05)


def _dequantize_q8_0(raw: bytes) -> np.ndarray:
    # ggml's dequantize_row_q8_0, written out independently of the quantiser.
    blocks = np.frombuffer(raw, dtype=[("d", "<f2"), ("qs", "i1", 32)])
    return (blocks["qs"].astype(np.float32) * blocks["d"].astype(np.float32)[:, None]).ravel()


def _dequantize_q4_0(raw: bytes) -> np.ndarray:
    # ggml's dequantize_row_q4_0: byte j holds value j (low nibble) and value j + 16 (high).
    blocks = np.frombuffer(raw, dtype=[("d", "<f2"), ("qs", "u1", 16)])
    low = (blocks["qs"] & 0x0F).astype(np.float32) - 8
    high = (blocks["qs"] >> 4).astype(np.float32) - 8
    d = blocks["d"].astype(np.float32)[:, None]
    return np.concatenate([low * d, high * d], axis=1).ravel()


@pytest.mark.parametrize(
    ("quantize", "dequantize", "bytes_per_block", "max_error_in_steps"),
    # Half a step for rounding (a whole one for Q4_0's value opposite the block's extreme, as its
    # 16 levels are asymmetric), plus the scale's own f16 rounding (2^-11 relative, x the levels).
    [(quantize_q8_0, _dequantize_q8_0, 34, 0.57), (quantize_q4_0, _dequantize_q4_0, 18, 1.01)],
)
def test_quantisers_match_ggml_block_layout(
    quantize: Any, dequantize: Any, bytes_per_block: int, max_error_in_steps: float
) -> None:
    x = np.random.default_rng(3).normal(0, 0.05, size=(6, 64)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block must not divide by zero
    raw = quantize(x)
    assert len(raw) == x.size // 32 * bytes_per_block
    back = dequantize(raw).reshape(x.shape)
    np.testing.assert_array_equal(back[0, :32], 0.0)
    blocks, restored = x.reshape(-1, 32), back.reshape(-1, 32)
    levels = 127.0 if bytes_per_block == 34 else 8.0
    step = np.abs(blocks).max(axis=1, keepdims=True) / levels
    assert np.all(np.abs(restored - blocks) <= max_error_in_steps * step + 1e-7)


def test_quantiser_rejects_rows_not_a_multiple_of_32() -> None:
    with pytest.raises(ModelError, match="multiple of 32"):
        quantize_q4_0(np.ones((2, 48), dtype=np.float32))


def test_quantised_ggml_marks_file_and_matrix_types(ct2_dir: Path) -> None:
    model = read_ct2(ct2_dir / "model.bin")
    for quant, ftype, matrix_type in (("q8_0", 2007, 8), ("q4_0", 2002, 2)):
        out = io.BytesIO()
        write_ggml(model, read_tokens(ct2_dir), out, quant=quant)
        header = struct.unpack_from("<12i", out.getvalue())
        assert header[-1] == ftype
        _, _, _, tensors = _read_ggml(out.getvalue())
        assert tensors["encoder.blocks.0.mlp.0.weight"][0] == matrix_type
        assert tensors["encoder.conv1.weight"][0] == 1  # convolution kernels stay f16
        assert tensors["decoder.ln.weight"][0] == 0
