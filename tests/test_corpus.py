from kvcli.corpus import corpus_files, corpus_texts, token_chunks


def test_calibration_and_heldout_files_do_not_overlap():
    cal, held = corpus_files("calibration"), corpus_files("heldout")
    assert len(cal) > 100 and len(held) > 20
    assert not set(cal) & set(held)


def test_chunks_have_exact_length_and_distinct_text():
    chunks = list(token_chunks("heldout", lambda s: list(s.encode()), chunk_tokens=64,
                               n_chunks=5, bos=1))
    assert len(chunks) == 5
    assert all(len(t) == 64 and t[0] == 1 for _, t in chunks)
    assert len({tuple(t) for _, t in chunks}) == 5


def test_chunks_per_file_are_consecutive_pieces_of_one_file():
    def tokenize(s):
        return list(s.encode())

    one = list(token_chunks("calibration", tokenize, chunk_tokens=64, n_chunks=3, bos=1))
    many = list(token_chunks("calibration", tokenize, chunk_tokens=64, n_chunks=3, bos=1, per_file=3))
    assert many[0] == one[0]  # the first chunk of a file is the same either way
    assert [name for name, _ in many] == [one[0][0], f"{one[0][0]}@63", f"{one[0][0]}@126"]
    text = bytes(t for _, chunk in many for t in chunk[1:])
    assert text == bytes(tokenize(dict(corpus_texts("calibration"))[one[0][0]])[:189])
