"""Packing, sampling and splitting of healing data."""

import torch

from heal_helpers import CharTokenizer
from switchhead.healing.data import PackedTokens, Sampler, Sentences, find_text_files, pack_files, split_files, text_lines


def test_packed_windows_drop_the_tail_and_batch_by_index():
    data = PackedTokens(torch.arange(23), seq_len=5)
    assert len(data) == 4
    args, kwargs = data.batch([3, 0])
    assert args == () and kwargs["input_ids"].tolist() == [[15, 16, 17, 18, 19], [0, 1, 2, 3, 4]]
    assert PackedTokens(torch.arange(10), 5, key=None).batch([1])[0][0].tolist() == [[5, 6, 7, 8, 9]]


def test_sampler_is_a_pure_function_of_position_and_reshuffles_each_epoch():
    a, b = Sampler(10, seed=3), Sampler(10, seed=3)
    first = a.indices(0, 10)
    assert sorted(first) == list(range(10))
    assert a.indices(4, 9) == b.indices(4, 9) == first[4:] + b.indices(10, 3)
    assert a.indices(10, 10) != first and sorted(a.indices(10, 10)) == list(range(10))
    assert Sampler(10, seed=4).indices(0, 10) != first


def test_split_by_file_is_stable_and_disjoint(tmp_path):
    for i in range(40):
        (tmp_path / f"m{i}.py").write_text(f"x = {i}\n")
    files = find_text_files([tmp_path])
    train, held = split_files(files, held_out=0.2)
    assert set(train).isdisjoint(held) and len(train) + len(held) == 40 and held
    assert split_files(list(reversed(files)), held_out=0.2)[1] == sorted(held, reverse=True)


def test_pack_files_separates_documents_with_eos(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "b.txt").write_text("de")
    data = pack_files(find_text_files([tmp_path]), CharTokenizer(), seq_len=3)
    assert data.windows.flatten().tolist() == [1, 2, 3, 0, 4, 5]  # "abc" EOS "de" (its EOS is the dropped tail)


def test_sentences_pad_per_batch(tmp_path):
    (tmp_path / "t.txt").write_text("short line here, long enough\n\n  x\nanother line, also long enough to keep\n")
    lines = text_lines([tmp_path / "t.txt"], min_chars=10)
    assert lines == ["short line here, long enough", "another line, also long enough to keep"]
    _, kwargs = Sentences(lines, CharTokenizer(), max_length=30).batch([0, 1])
    assert kwargs["input_ids"].shape == (2, 30) and kwargs["attention_mask"][0].sum() == len(lines[0])
