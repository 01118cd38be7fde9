"""Encryption parameters and their security.

The bounds are those of the Homomorphic Encryption Standard (homomorphicencryption.org,
2018), table for a ternary secret and classical attacks, which SEAL also enforces. SHE
never builds a context above them: :func:`check_security` refuses the parameters with a
clear error before SEAL is involved.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import tenseal.sealapi as sealapi

from ..errors import ParameterError

#: Largest total coefficient-modulus bits (special prime included) per ring size and level.
MAX_MODULUS_BITS: dict[int, dict[int, int]] = {
    128: {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881},
    192: {1024: 19, 2048: 37, 4096: 75, 8192: 152, 16384: 305, 32768: 611},
    256: {1024: 14, 2048: 29, 4096: 58, 8192: 118, 16384: 237, 32768: 476},
}
RING_SIZES = (4096, 8192, 16384, 32768)
MIN_SECURITY = 128
MIN_PRIME_BITS = 20
MAX_PRIME_BITS = 60
SCHEMES = ("ckks", "bfv")
#: SEAL's largest plaintext modulus (BFV).
MAX_PLAIN_MODULUS_BITS = 60


def check_security(poly_modulus_degree: int, modulus_bits: list[int], security: int = 128) -> None:
    """Raise :class:`ParameterError` unless the parameters reach ``security`` bits.

    ``modulus_bits`` lists every prime of the coefficient modulus, special prime included.
    """
    if security not in MAX_MODULUS_BITS or security < MIN_SECURITY:
        raise ParameterError(
            f"security level {security} is not allowed: SHE requires 128, 192 or 256 bits"
        )
    table = MAX_MODULUS_BITS[security]
    if poly_modulus_degree not in table:
        raise ParameterError(
            f"poly_modulus_degree {poly_modulus_degree} is not one of {sorted(table)}"
        )
    total = sum(modulus_bits)
    limit = table[poly_modulus_degree]
    if total > limit:
        raise ParameterError(
            f"a {total}-bit coefficient modulus with N={poly_modulus_degree} is below "
            f"{security}-bit security (at most {limit} bits allowed); use a larger ring size "
            "or fewer/smaller primes"
        )
    bad = [b for b in modulus_bits if not MIN_PRIME_BITS <= b <= MAX_PRIME_BITS]
    if bad:
        raise ParameterError(
            f"prime sizes {bad} are outside [{MIN_PRIME_BITS}, {MAX_PRIME_BITS}] bits"
        )


def smallest_ring(total_bits: int, security: int = 128, minimum: int = 4096) -> int:
    """The smallest ring size whose modulus bound holds ``total_bits`` at ``security`` bits."""
    for n in RING_SIZES:
        if n >= minimum and MAX_MODULUS_BITS[security][n] >= total_bits:
            return n
    raise ParameterError(
        f"the model needs a {total_bits}-bit modulus, more than any ring size allows at "
        f"{security}-bit security; reduce its depth or precision"
    )


def batching_prime(bits: int, poly_modulus_degree: int) -> int:
    """A ``bits``-bit prime ``t = 1 mod 2N``: a BFV plaintext modulus with ``N`` slots."""
    if not 2 <= bits <= MAX_PLAIN_MODULUS_BITS:
        raise ParameterError(f"a {bits}-bit plaintext modulus is outside 2..{MAX_PLAIN_MODULUS_BITS}")
    try:
        return int(sealapi.PlainModulus.Batching(poly_modulus_degree, bits).value())
    except (ValueError, RuntimeError) as exc:
        raise ParameterError(f"SEAL finds no {bits}-bit batching prime for "
                             f"N={poly_modulus_degree}: {exc}") from exc


@dataclass(frozen=True)
class EncryptionParameters:
    """A scheme, a ring size and a coefficient modulus (special prime last); BFV adds its
    plaintext modulus (a prime ``= 1 mod 2N``, so that every coefficient is a slot)."""

    scheme: str
    poly_modulus_degree: int
    modulus_bits: tuple[int, ...]
    security: int = 128
    primes: tuple[int, ...] = field(default=(), compare=False)
    plain_modulus: int = 0

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ParameterError(f"scheme {self.scheme!r} is not supported; use one of {SCHEMES}")
        if (self.scheme == "bfv") != (self.plain_modulus > 0):
            raise ParameterError("a BFV context needs a plaintext modulus, a CKKS one has none")
        if self.plain_modulus and (self.plain_modulus <= 2 * self.poly_modulus_degree
                                   or self.plain_modulus % (2 * self.poly_modulus_degree) != 1
                                   or self.plain_modulus.bit_length() > MAX_PLAIN_MODULUS_BITS):
            raise ParameterError(f"plaintext modulus {self.plain_modulus} is not a batching "
                                 f"modulus (= 1 mod {2 * self.poly_modulus_degree}, at most "
                                 f"{MAX_PLAIN_MODULUS_BITS} bits)")
        check_security(self.poly_modulus_degree, list(self.modulus_bits), self.security)
        if not self.primes:
            try:
                moduli = sealapi.CoeffModulus.Create(self.poly_modulus_degree,
                                                     list(self.modulus_bits))
            except (ValueError, RuntimeError) as exc:
                raise ParameterError(
                    f"SEAL cannot find primes of sizes {list(self.modulus_bits)} for "
                    f"N={self.poly_modulus_degree}: {exc}"
                ) from exc
            object.__setattr__(self, "primes", tuple(m.value() for m in moduli))

    @property
    def ciphertext_primes(self) -> tuple[int, ...]:
        """The primes of a fresh ciphertext (all but the special prime)."""
        return self.primes[:-1]

    @property
    def total_bits(self) -> int:
        return sum(self.modulus_bits)

    @property
    def slots(self) -> int:
        """Values per ciphertext: N/2 complex slots in CKKS, N integer slots in BFV."""
        return self.poly_modulus_degree // (1 if self.scheme == "bfv" else 2)

    def fingerprint(self) -> str:
        """A short hash that identifies these parameters (used to match keys and data)."""
        text = f"{self.scheme}|{self.poly_modulus_degree}|{','.join(map(str, self.primes))}"
        if self.plain_modulus:
            text += f"|t={self.plain_modulus}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def from_spec(cls, spec: dict) -> EncryptionParameters:
        """Rebuild and re-check the parameters described by a plan's public spec."""
        try:
            params = cls(str(spec["scheme"]), int(spec["poly_modulus_degree"]),
                         tuple(int(b) for b in spec["modulus_bits"]),
                         int(spec.get("security_bits", 128)),
                         plain_modulus=int(spec.get("plain_modulus", 0)))
            primes = tuple(int(p) for p in spec["primes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ParameterError(f"malformed model spec: {exc!r}") from exc
        if primes != params.primes:
            raise ParameterError("model spec primes do not match its modulus bit sizes")
        return params
