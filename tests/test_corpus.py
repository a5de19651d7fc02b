from kvcli.corpus import corpus_files, token_chunks


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
