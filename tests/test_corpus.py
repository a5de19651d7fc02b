from kvcli.predict.corpus import (
    PASTED_CHARS,
    corpus_files,
    corpus_texts,
    docstring_texts,
    mixed_texts,
    token_chunks,
)


def test_calibration_and_heldout_files_do_not_overlap():
    cal, held = corpus_files("calibration"), corpus_files("heldout")
    assert len(cal) > 100 and len(held) > 20
    assert not set(cal) & set(held)


def test_chunks_have_exact_length_and_distinct_text():
    chunks = list(token_chunks("heldout", lambda s: list(s.encode()), chunk_tokens=64, n_chunks=5, bos=1))
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


def test_mixed_text_takes_code_prose_and_conversations_in_turn_from_calibration_files():
    def render(messages):
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)

    texts = list(mixed_texts("calibration", render))
    assert len(texts) >= 30 and len(texts) % 3 == 0
    sources = dict(corpus_texts("calibration"))
    prose = dict(docstring_texts("calibration"))
    heldout = {name for name, _ in docstring_texts("heldout")} | {n for n, _ in corpus_texts("heldout")}
    for i in range(0, len(texts), 3):
        (code_name, code), (prose_name, doc), (conv_name, conv) = texts[i : i + 3]
        assert sources[code_name] == code and prose[prose_name] == doc
        pasted_from = conv_name.removesuffix(":conversation")
        assert conv.startswith("<user>") and "</user><assistant>" in conv
        pasted = conv[len("<user>") : conv.index("</user>")]
        assert prose[pasted_from].startswith(pasted.removesuffix("\n\nWhat does this text describe?"))
        assert len(pasted) <= PASTED_CHARS + 200 or "\n\n" not in prose[pasted_from]
        assert {code_name, prose_name, pasted_from}.isdisjoint(heldout)
    # each docstring file serves once: as prose or as one side of a conversation
    used = [n for n, _ in texts[1::3]] + [n.removesuffix(":conversation") for n, _ in texts[2::3]]
    assert len(used) == len(set(used))
