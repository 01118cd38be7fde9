"""SEAL's ciphertext format read into numpy and written back, checked against SEAL itself."""

from __future__ import annotations

import dataclasses
import struct
import zlib

import numpy as np
import pytest
import tenseal.sealapi as sealapi
import zstandard

import she
from she.io import sealbytes
from she.io.context import SealBridge, level_specs

HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, mode, reserved, total
# Offsets in an *uncompressed* serialisation (16-byte header, then the body).
OFF_PARMS_ID = 16
OFF_NTT = 48
OFF_SIZE = 49
OFF_DEGREE = 57
OFF_LIMBS = 65
OFF_SCALE = 73
OFF_NESTED = 89
OFF_COUNT = 105
OFF_COEFFS = 113


@pytest.fixture(scope="module")
def setup(toy_plan, toy_server_client, toy_message, toy_inputs):
    """(client, top level spec, bridge, one SEAL-saved ciphertext blob, its feature index)."""
    _, client, _ = toy_server_client
    limbs = len(toy_plan.params.ciphertext_primes)
    level = level_specs(client.ctx)[limbs]
    feature = int(np.argmax(toy_inputs[0].ravel()))  # a bright pixel of sample 0
    bridge = SealBridge(client.ctx)
    yield client, level, bridge, toy_message.items[feature], feature
    bridge.close()


def _patch(blob: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(blob)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _with_header(blob: bytes, body: bytes, **fields) -> bytes:
    """``body`` behind ``blob``'s header, with the total size fixed and ``fields`` replaced."""
    magic, hsize, major, minor, mode, reserved, _ = HEADER.unpack_from(blob)
    values = {"magic": magic, "hsize": hsize, "major": major, "minor": minor, "mode": mode,
              "reserved": reserved, "total": HEADER.size + len(body)}
    values.update(fields)
    return HEADER.pack(*values.values()) + body


def _decrypt(client: she.Client, ct: sealapi.Ciphertext) -> np.ndarray:
    seal = client.ctx.seal_context().data
    plain = sealapi.Plaintext()
    sealapi.Decryptor(seal, client.ctx.secret_key().data).decrypt(ct, plain)
    return np.asarray(sealapi.CKKSEncoder(seal).decode_double(plain))


def _load_seal(client: she.Client, blob: bytes, path) -> sealapi.Ciphertext:
    seal = client.ctx.seal_context().data
    path.write_bytes(blob)
    ct = sealapi.Ciphertext(seal)
    ct.load(seal, str(path))
    return ct


# -- what SEAL writes -----------------------------------------------------------------------------

def test_seal_version_is_what_seal_writes(setup):
    _, _, _, blob, _ = setup
    magic, hsize, major, minor, mode, _, total = HEADER.unpack_from(blob)
    assert (blob[3], blob[4]) == sealbytes.SEAL_VERSION
    assert (major, minor) == sealbytes.SEAL_VERSION
    assert magic == sealbytes.MAGIC and hsize == 16
    assert total == len(blob)
    assert mode in (sealbytes.COMPR_ZLIB, sealbytes.COMPR_ZSTD)  # SEAL compresses by default


def test_parse_real_ciphertext(setup, toy_plan):
    _, level, _, blob, _ = setup
    raw = sealbytes.parse(blob, level)
    n = toy_plan.params.poly_modulus_degree
    assert raw.data.shape == (2, level.limbs, n) and raw.data.dtype == np.uint64
    assert level.moduli == toy_plan.params.ciphertext_primes
    assert np.all(raw.data < np.array(level.moduli, dtype=np.uint64)[None, :, None])
    assert raw.scale == toy_plan.input_scale
    assert raw.parms_id == level.parms_id
    assert raw.ntt_form is True and raw.correction_factor == 1
    # Random-looking coefficients, not an all-zero array.
    assert np.count_nonzero(raw.data) > raw.data.size * 0.99


@pytest.mark.parametrize("compress", [False, True])
def test_serialize_loads_into_seal_and_decrypts_identically(setup, toy_inputs, tmp_path, compress):
    client, level, bridge, blob, feature = setup
    raw = sealbytes.parse(blob, level)
    data = sealbytes.serialize(raw, compress=compress)
    assert data[5] == (sealbytes.COMPR_ZSTD if compress else sealbytes.COMPR_NONE)
    if not compress:
        assert len(data) == HEADER.size + level.raw_size()
        assert len(data) == OFF_COEFFS + 8 * raw.data.size
    # Our bytes parse back to the same arrays.
    again = sealbytes.parse(data, level)
    assert np.array_equal(again.data, raw.data) and again.scale == raw.scale
    # SEAL loads them (directly from the bytes, and through the bridge) ...
    ours = _decrypt(client, _load_seal(client, data, tmp_path / "ours"))
    original = _decrypt(client, _load_seal(client, blob, tmp_path / "original"))
    via_bridge = _decrypt(client, bridge.to_seal(raw))
    # ... and they decrypt exactly as SEAL's own serialisation does.
    assert np.array_equal(ours, original) and np.array_equal(via_bridge, original)
    # The values are the encrypted pixels (batch of 2 in slots 0 and 1, zeros after).
    expected = toy_inputs[:, 0].reshape(2, -1)[:, feature]
    np.testing.assert_allclose(original[:2], expected, atol=1e-4)
    np.testing.assert_allclose(original[2:16], 0.0, atol=1e-4)


def test_bridge_round_trip_keeps_the_arrays(setup):
    _, level, bridge, blob, _ = setup
    raw = sealbytes.parse(blob, level)
    back = bridge.from_seal(bridge.to_seal(raw))
    assert np.array_equal(back.data, raw.data)
    assert back.scale == raw.scale and back.parms_id == raw.parms_id


# -- malformed bytes ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_blob(setup) -> bytes:
    """The ciphertext, uncompressed (so that body fields can be patched in place)."""
    _, level, _, blob, _ = setup
    return sealbytes.serialize(sealbytes.parse(blob, level))


def test_truncated(setup, plain_blob):
    _, level, _, blob, _ = setup
    for cut in (0, 1, 15):
        with pytest.raises(she.FormatError, match="too short"):
            sealbytes.parse(blob[:cut], level)
    for data in (blob[:-1], plain_blob[:-8], blob[:16]):
        with pytest.raises(she.FormatError, match="SEAL header says"):
            sealbytes.parse(data, level)
    # Header fixed to the shorter length: the body itself is too short.
    for data in (plain_blob[16:-8], plain_blob[16:200], b""):
        with pytest.raises(she.FormatError, match="ciphertext body has"):
            sealbytes.parse(_with_header(plain_blob, data), level)
    compressed = blob[16:]
    with pytest.raises(she.FormatError):
        sealbytes.parse(_with_header(blob, compressed[: len(compressed) // 2]), level)


def test_bad_magic(setup, plain_blob):
    _, level, _, blob, _ = setup
    for data in (_patch(blob, 0, "<H", 0xA15F), _patch(plain_blob, 0, "<H", 0x5EA1)):
        with pytest.raises(she.FormatError, match="bad magic"):
            sealbytes.parse(data, level)


def test_header_size_field(setup):
    _, level, _, blob, _ = setup
    for hsize in (0, 15, 17, 255):
        with pytest.raises(she.FormatError, match="header size"):
            sealbytes.parse(_patch(blob, 2, "<B", hsize), level)


def test_total_size_field_mismatch(setup):
    _, level, _, blob, _ = setup
    for total in (len(blob) - 1, len(blob) + 1, 0, 2 ** 64 - 1):
        with pytest.raises(she.FormatError, match=f"SEAL header says {total} bytes"):
            sealbytes.parse(_patch(blob, 8, "<Q", total), level)


def test_unsupported_version_and_mode(setup):
    _, level, _, blob, _ = setup
    for major in (3, 5, 0):
        with pytest.raises(she.FormatError, match="version"):
            sealbytes.parse(_patch(blob, 3, "<B", major), level)
    for mode in (3, 255):
        with pytest.raises(she.FormatError, match="unknown SEAL compression mode"):
            sealbytes.parse(_patch(blob, 5, "<B", mode), level)


def test_body_that_does_not_decompress(setup):
    _, level, _, blob, _ = setup
    garbage = np.random.default_rng(5).bytes(4096)
    for mode in (sealbytes.COMPR_ZSTD, sealbytes.COMPR_ZLIB):
        with pytest.raises(she.FormatError, match="does not decompress"):
            sealbytes.parse(_with_header(blob, garbage, mode=mode), level)
    # A valid stream of the other compressor.
    zlib_body = zlib.compress(bytes(level.raw_size()))
    with pytest.raises(she.FormatError, match="does not decompress"):
        sealbytes.parse(_with_header(blob, zlib_body, mode=sealbytes.COMPR_ZSTD), level)


def test_decompression_is_capped(setup):
    """A small body that expands beyond the expected size is refused, not inflated."""
    _, level, _, blob, _ = setup
    bomb = bytes(level.raw_size() * 4)
    for mode, body in ((sealbytes.COMPR_ZSTD, zstandard.ZstdCompressor().compress(bomb)),
                       (sealbytes.COMPR_ZLIB, zlib.compress(bomb))):
        assert len(body) < level.raw_size()
        with pytest.raises(she.FormatError, match="larger than the model allows"):
            sealbytes.parse(_with_header(blob, body, mode=mode), level)


def test_trailing_bytes_and_truncated_streams(setup):
    """Exactly one compressed stream: trailing bytes or a cut-off stream are refused."""
    _, level, _, blob, _ = setup
    body = sealbytes.parse(blob, level)
    plain = sealbytes.serialize(body)
    raw_body = plain[HEADER.size:]
    for mode, packed in ((sealbytes.COMPR_ZSTD, zstandard.ZstdCompressor().compress(raw_body)),
                         (sealbytes.COMPR_ZLIB, zlib.compress(raw_body))):
        assert np.array_equal(sealbytes.parse(_with_header(blob, packed, mode=mode), level).data,
                              body.data)
        with pytest.raises(she.FormatError, match="unexpected bytes after"):
            sealbytes.parse(_with_header(blob, packed + b"junk", mode=mode), level)
        with pytest.raises(she.FormatError, match="truncated|does not decompress"):
            sealbytes.parse(_with_header(blob, packed[: len(packed) // 2], mode=mode), level)


def test_wrong_parms_id(setup, plain_blob, foreign_ciphertext):
    client, level, _, blob, _ = setup
    other = dataclasses.replace(level, parms_id=(1, 2, 3, 4))
    for data in (blob, plain_blob):
        with pytest.raises(she.FormatError, match="parms_id"):
            sealbytes.parse(data, other)
    # A ciphertext of the same shape made under other primes.
    with pytest.raises(she.FormatError, match="parms_id"):
        sealbytes.parse(foreign_ciphertext, level)
    # A patched parms_id word.
    with pytest.raises(she.FormatError, match="parms_id"):
        sealbytes.parse(_patch(plain_blob, OFF_PARMS_ID + 24, "<Q", level.parms_id[3] ^ 1), level)


def test_ciphertext_parsed_against_another_level(setup, plain_blob):
    client, level, _, blob, _ = setup
    lower = level_specs(client.ctx)[level.limbs - 1]
    for data in (blob, plain_blob):  # the body is larger than a lower-level one
        with pytest.raises(she.FormatError, match="larger than the model allows"):
            sealbytes.parse(data, lower)
    # And a lower-level ciphertext against the top level: the body is too short.
    raw = sealbytes.parse(plain_blob, level)
    small = dataclasses.replace(raw, data=raw.data[:, : lower.limbs].copy())
    with pytest.raises(she.FormatError, match=f"{level.limbs} RNS limbs"):
        sealbytes.parse(sealbytes.serialize(small), level)


@pytest.mark.parametrize("poly, limb, index", [(0, 0, 0), (1, -1, -1), (0, 2, 4095)])
def test_coefficient_not_below_its_modulus(setup, plain_blob, poly, limb, index):
    _, level, _, _, _ = setup
    n, limbs = level.poly_modulus_degree, level.limbs
    limb %= limbs
    index %= n
    offset = OFF_COEFFS + 8 * ((poly * limbs + limb) * n + index)
    for value in (level.moduli[limb], level.moduli[limb] + 1, 2 ** 64 - 1):
        with pytest.raises(she.FormatError, match="out of range"):
            sealbytes.parse(_patch(plain_blob, offset, "<Q", value), level)
    # modulus - 1 is a valid coefficient.
    raw = sealbytes.parse(_patch(plain_blob, offset, "<Q", level.moduli[limb] - 1), level)
    assert int(raw.data[poly, limb, index]) == level.moduli[limb] - 1


def test_out_of_range_coefficient_in_compressed_form(setup):
    _, level, _, blob, _ = setup
    raw = sealbytes.parse(blob, level)
    raw.data[1, 0, 7] = level.moduli[0]
    with pytest.raises(she.FormatError, match="out of range"):
        sealbytes.parse(sealbytes.serialize(raw, compress=True), level)


def test_wrong_polynomial_count(setup, plain_blob):
    _, level, _, blob, _ = setup
    # Expecting 3 polynomials: the body is too short.
    with pytest.raises(she.FormatError, match="3-polynomial"):
        sealbytes.parse(blob, level, size=3)
    # A 3-polynomial ciphertext where 2 are expected: the body is too long.
    raw = sealbytes.parse(blob, level)
    three = dataclasses.replace(raw, data=np.concatenate([raw.data, raw.data[:1]]))
    for compress in (False, True):
        with pytest.raises(she.FormatError, match="larger than the model allows"):
            sealbytes.parse(sealbytes.serialize(three, compress=compress), level)
    # The size field alone says 3 (the data is that of 2).
    with pytest.raises(she.FormatError, match="size 3"):
        sealbytes.parse(_patch(plain_blob, OFF_SIZE, "<Q", 3), level)
    with pytest.raises(she.FormatError, match="size 1"):
        sealbytes.parse(_patch(plain_blob, OFF_SIZE, "<Q", 1), level)


def test_shape_fields_must_match(setup, plain_blob):
    _, level, _, _, _ = setup
    n = level.poly_modulus_degree
    with pytest.raises(she.FormatError, match=f"degree {2 * n}"):
        sealbytes.parse(_patch(plain_blob, OFF_DEGREE, "<Q", 2 * n), level)
    with pytest.raises(she.FormatError, match=f"limbs {level.limbs + 1}"):
        sealbytes.parse(_patch(plain_blob, OFF_LIMBS, "<Q", level.limbs + 1), level)
    with pytest.raises(she.FormatError, match="NTT form"):
        sealbytes.parse(_patch(plain_blob, OFF_NTT, "<B", 0), level)


def test_nested_array_header_and_count(setup, plain_blob):
    _, level, _, _, _ = setup
    with pytest.raises(she.FormatError, match="coefficient array header"):
        sealbytes.parse(_patch(plain_blob, OFF_NESTED, "<H", 0), level)
    with pytest.raises(she.FormatError, match="coefficient array header"):
        sealbytes.parse(_patch(plain_blob, OFF_NESTED + 5, "<B", sealbytes.COMPR_ZSTD), level)
    with pytest.raises(she.FormatError, match="coefficient count"):
        sealbytes.parse(_patch(plain_blob, OFF_COUNT, "<Q", 12345), level)


@pytest.mark.parametrize("scale", [-1.0, -2.0 ** 30, 0.0, -0.0, float("nan"), float("inf"),
                                   float("-inf")])
def test_bad_scale(setup, scale):
    _, level, _, blob, _ = setup
    raw = dataclasses.replace(sealbytes.parse(blob, level), scale=scale)
    for compress in (False, True):
        with pytest.raises(she.FormatError, match="scale"):
            sealbytes.parse(sealbytes.serialize(raw, compress=compress), level)


def test_scale_is_read_from_its_field(setup, plain_blob):
    _, level, _, _, _ = setup
    raw = sealbytes.parse(_patch(plain_blob, OFF_SCALE, "<d", 12.5), level)
    assert raw.scale == 12.5
    with pytest.raises(she.FormatError, match="scale"):
        sealbytes.parse(_patch(plain_blob, OFF_SCALE, "<d", -12.5), level)


# -- seeded ciphertexts (single-packing uploads) ---------------------------------------------------

def _seeded_blob(client: she.Client, bridge: SealBridge, values: np.ndarray) -> bytes:
    seal = client.ctx.seal_context().data
    plain = sealapi.Plaintext()
    sealapi.CKKSEncoder(seal).encode(values.tolist(), 2.0 ** 30, plain)
    encryptor = sealapi.Encryptor(seal, client.ctx.secret_key().data)
    return bridge.save_serializable(encryptor.encrypt_symmetric(plain))


def test_seeded_ciphertext_parses_and_matches_seals_expansion(setup, tmp_path):
    client, level, bridge, blob, _ = setup
    values = np.linspace(-1, 1, client.params.slots)
    seeded = _seeded_blob(client, bridge, values)
    assert len(seeded) < 0.6 * len(blob)  # the second polynomial is a 64-byte seed
    raw = sealbytes.parse(seeded, level, seeded=True)
    assert raw.data.shape == (1, level.limbs, level.poly_modulus_degree)
    expanded = bridge.from_seal(_load_seal(client, seeded, tmp_path / "ct"))
    np.testing.assert_array_equal(raw.data[0], expanded.data[0])
    assert np.abs(_decrypt(client, bridge.load(seeded)) - values).max() < 1e-6
    # Each form is refused where the other is expected.
    with pytest.raises(she.FormatError, match="bytes, expected"):
        sealbytes.parse(seeded, level)
    with pytest.raises(she.FormatError, match="larger than the model allows"):
        sealbytes.parse(blob, level, seeded=True)


@pytest.mark.parametrize("damage", ["prng-type", "seed-header", "coefficient"])
def test_damaged_seeded_ciphertext_is_refused(setup, damage):
    client, level, bridge, _, _ = setup
    seeded = _seeded_blob(client, bridge, np.zeros(4))
    body = bytearray(zstandard.ZstdDecompressor().decompress(
        seeded[HEADER.size:], max_output_size=level.raw_size(seeded=True)))
    info = len(body) - (HEADER.size + 1 + 64)
    if damage == "prng-type":
        body[info + HEADER.size] = 7
    elif damage == "seed-header":
        body[info] ^= 0xFF
    else:
        struct.pack_into("<Q", body, OFF_COEFFS - HEADER.size, level.moduli[0])
    damaged = _with_header(seeded, bytes(body), mode=sealbytes.COMPR_NONE)
    with pytest.raises(she.FormatError, match="seed|random generator|out of range"):
        sealbytes.parse(damaged, level, seeded=True)
