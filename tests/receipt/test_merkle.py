"""RFC 6962 hashing against the Certificate Transparency reference vectors, and proofs over many tree sizes."""

from __future__ import annotations

import pytest

from sisa.receipt.merkle import EMPTY_ROOT, Frontier, Tree, hash_leaf, verify_consistency, verify_inclusion

# The reference entries and tree heads of the Certificate Transparency test data (sizes 0..8).
ENTRIES = [bytes.fromhex(h) for h in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                      "606162636465666768696a6b6c6d6e6f"]]  # fmt: skip
ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
INCLUSION = [
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]  # fmt: skip
CONSISTENCY = [
    (2, 8, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]  # fmt: skip

LEAVES = [hash_leaf(e) for e in ENTRIES]


def test_tree_heads_match_the_reference_for_every_size() -> None:
    tree = Tree(LEAVES)
    assert EMPTY_ROOT.hex() == ROOTS[0]
    assert [tree.root(n).hex() for n in range(9)] == ROOTS
    assert [Tree(LEAVES[:n]).root().hex() for n in range(9)] == ROOTS


def test_the_frontier_gives_every_head_of_a_growing_log() -> None:
    frontier, heads = Frontier(), [Frontier().root().hex()]
    for leaf in LEAVES:
        frontier.append(leaf)
        heads.append(frontier.root().hex())
    assert heads == ROOTS  # the reference vectors, appended one by one
    many = [hash_leaf(bytes([i % 256, i // 256])) for i in range(300)]
    grown, tree = Frontier(), Tree(many)
    for n, leaf in enumerate(many, 1):
        grown.append(leaf)
        assert grown.size == n and len(grown.nodes) == bin(n).count("1") and grown.root() == tree.root(n), n
    # Rebuilt from what a store keeps (size and nodes), it goes on as if never stopped.
    again = Frontier(grown.size, grown.nodes)
    again.append(LEAVES[1])
    assert again.root() == Tree([*many, LEAVES[1]]).root()
    with pytest.raises(ValueError, match="nodes"):
        Frontier(5, grown.nodes[:1])


@pytest.mark.parametrize(("index", "size", "proof"), INCLUSION)
def test_inclusion_proofs_match_the_reference(index: int, size: int, proof: list[str]) -> None:
    assert [p.hex() for p in Tree(LEAVES).inclusion_proof(index, size)] == proof
    assert verify_inclusion(LEAVES[index], index, size, [bytes.fromhex(p) for p in proof], bytes.fromhex(ROOTS[size]))


@pytest.mark.parametrize(("first", "second", "proof"), CONSISTENCY)
def test_consistency_proofs_match_the_reference(first: int, second: int, proof: list[str]) -> None:
    assert [p.hex() for p in Tree(LEAVES).consistency_proof(first, second)] == proof
    raw = [bytes.fromhex(p) for p in proof]
    assert verify_consistency(first, second, bytes.fromhex(ROOTS[first]), bytes.fromhex(ROOTS[second]), raw)


MANY = [hash_leaf(i.to_bytes(2, "big")) for i in range(37)]


def test_every_inclusion_proof_verifies_and_a_changed_one_does_not() -> None:
    tree = Tree(MANY)
    for size in range(1, 38):
        root = tree.root(size)
        for index in range(size):
            proof = tree.inclusion_proof(index, size)
            assert verify_inclusion(MANY[index], index, size, proof, root)
            assert not verify_inclusion(MANY[(index + 1) % 37], index, size, proof, root)
            if proof:
                bent = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
                assert not verify_inclusion(MANY[index], index, size, bent, root)
                assert not verify_inclusion(MANY[index], index, size, proof[:-1], root)


def test_every_consistency_proof_verifies_and_a_rewritten_log_does_not() -> None:
    tree = Tree(MANY)
    other = Tree([*MANY[:3], hash_leaf(b"rewritten"), *MANY[4:]])  # entry 3 changed after the fact
    for second in range(38):
        for first in range(second + 1):
            proof = tree.consistency_proof(first, second)
            assert verify_consistency(first, second, tree.root(first), tree.root(second), proof)
            if 3 < first < second:
                forged = other.consistency_proof(first, second)
                assert not verify_consistency(first, second, tree.root(first), other.root(second), forged)
    assert not verify_consistency(4, 4, tree.root(4), tree.root(5), [])
    assert not verify_consistency(5, 4, tree.root(5), tree.root(4), [])
