from neurond.engine.detok import StopStringDetokenizer


class CharTokenizer:
    """One token per character; id 0 is a special token that decodes to nothing."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join("" if i == 0 else chr(i) for i in ids)


def run(text, stop):
    d = StopStringDetokenizer(CharTokenizer(), stop)
    out = []
    for ch in text:
        out.append(d.add(ord(ch)))
        if d.stopped:
            break
    out.append(d.flush())
    return "".join(out), d.stopped, out


def test_no_stop_streams_everything_immediately():
    text, stopped, pieces = run("hello", [])
    assert (text, stopped) == ("hello", False)
    assert pieces[:5] == list("hello")


def test_stop_string_is_cut_and_never_released():
    text, stopped, pieces = run("hello world, goodbye", ["world"])
    assert (text, stopped) == ("hello ", True)
    assert "w" not in "".join(pieces)


def test_holdback_releases_text_that_cannot_start_a_stop():
    text, stopped, _ = run("abcabd", ["abd"])
    assert (text, stopped) == ("abc", True)
    text, stopped, _ = run("abcab", ["abd"])
    assert (text, stopped) == ("abcab", False)  # flushed at the end


def test_earliest_of_several_stops_wins():
    text, _, _ = run("one two three", ["three", "two"])
    assert text == "one "
