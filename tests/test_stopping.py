"""Stop strings in streamed text: found across deltas, excluded from the output, nothing emitted after them."""

import pytest

from engine.stopping import StopChecker


def _feed_all(checker, deltas):
    """Feed deltas until a stop string matches; returns (emitted text, the match)."""
    emitted = []
    for delta in deltas:
        text, matched = checker.feed(delta)
        emitted.append(text)
        if matched is not None:
            return "".join(emitted), matched
    return "".join(emitted) + checker.flush(), None


def test_stop_string_split_across_three_deltas_is_found():
    checker = StopChecker(("<END>",))
    assert checker.feed("Hello <E") == ("Hello ", None)
    assert checker.feed("N") == ("", None)
    assert checker.feed("D> and more") == ("", "<END>")
    assert checker.flush() == ""


def test_text_before_the_stop_string_is_emitted_and_text_after_is_not():
    assert _feed_all(StopChecker(("STOP",)), ["one two ", "three STOP four", " five"]) == ("one two three ", "STOP")


def test_partial_prefix_is_held_then_released_when_it_does_not_match():
    checker = StopChecker(("\n\nUser:",))
    assert checker.feed("answer\n") == ("answer", None)
    assert checker.feed("\nUs") == ("", None)
    assert checker.feed("ually") == ("\n\nUsually", None)


def test_flush_releases_held_text():
    checker = StopChecker(("###",))
    assert checker.feed("done #") == ("done ", None)
    assert checker.feed("#") == ("", None)
    assert checker.flush() == "##"
    assert checker.flush() == ""


def test_earliest_of_several_stop_strings_wins():
    assert _feed_all(StopChecker(("world", "lo")), ["hello world"]) == ("hel", "lo")
    assert _feed_all(StopChecker(("lo", "hell")), ["hello"]) == ("", "hell")


@pytest.mark.parametrize("stop", [("abcd", "bc"), ("xyz", "y"), ("aab",), ("ab", "abc")])
def test_result_does_not_depend_on_how_the_text_is_split(stop):
    text = "zzaaabcdxyzab"
    whole = _feed_all(StopChecker(stop), [text])
    assert _feed_all(StopChecker(stop), list(text)) == whole
    assert _feed_all(StopChecker(stop), [text[:5], text[5:9], text[9:]]) == whole


def test_no_stop_strings_passes_text_straight_through():
    checker = StopChecker(())
    assert checker.feed("anything") == ("anything", None)
    assert checker.flush() == ""


def test_text_fed_while_matching_is_held_off_passes_and_a_later_stop_string_still_matches():
    # The engine holds matching off for a request's first min_tokens tokens.
    checker = StopChecker(("END",))
    assert checker.feed("one END two E", may_match=False) == ("one END two ", None)  # a possible start is held
    assert checker.feed("ND three") == ("", "END")
