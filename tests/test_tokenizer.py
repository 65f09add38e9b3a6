import numpy as np
import pytest

from hyena_jax.data import tokenizer as tok


def test_official_ids_and_left_padding():
  t = tok.CharacterTokenizer()
  # The official tokenizer: 'ACGTNACGTA' with max_length 10 -> truncated to 9 bases + [SEP].
  np.testing.assert_array_equal(t.encode("ACGTNACGTA", 10, truncate=True),
                                [7, 8, 9, 10, 11, 7, 8, 9, 10, 1])
  np.testing.assert_array_equal(t.encode("ACG", 6), [4, 4, 7, 8, 9, 1])
  np.testing.assert_array_equal(t.encode("ACG", 5, add_eos=False), [4, 4, 7, 8, 9])
  batch = t.encode_batch(["A", "ACGT"], 5)
  np.testing.assert_array_equal(batch, [[4, 4, 4, 7, 1], [7, 8, 9, 10, 1]])
  assert batch.dtype == np.int32


def test_nothing_is_truncated_silently():
  with pytest.raises(ValueError, match="truncate=True"):
    tok.CharacterTokenizer().encode("ACGTACGT", 5)


def test_lowercase_and_iupac_policies():
  upper = tok.CharacterTokenizer()
  np.testing.assert_array_equal(upper.tokenize("acgtn"), upper.tokenize("ACGTN"))
  np.testing.assert_array_equal(upper.tokenize("RYk"), [tok.N, tok.N, tok.N])
  official = tok.CharacterTokenizer(lowercase="unk", iupac="unk")
  np.testing.assert_array_equal(official.tokenize("aCgR"), [6, 8, 6, 6])
  with pytest.raises(ValueError, match="IUPAC"):
    tok.CharacterTokenizer(iupac="error").tokenize("ACR")
  with pytest.raises(ValueError, match=r"invalid character '-' at position 2"):
    upper.tokenize("AC-GT")
  with pytest.raises(ValueError, match="non-ASCII"):
    upper.tokenize("ACGé")
  with pytest.raises(ValueError, match="lowercase must be"):
    tok.CharacterTokenizer(lowercase="drop")


def test_decode_round_trip_and_reverse_complement():
  t = tok.CharacterTokenizer()
  seq = "ACGTNNACGGT"
  ids = t.encode(seq, 16)
  assert t.decode(ids) == seq
  assert t.decode(ids, skip_special=False).startswith("[PAD]")
  assert t.decode(t.reverse_complement(t.tokenize(seq))) == "ACCGTNNACGT"
  with pytest.raises(ValueError, match="token ids"):
    t.decode([99])
