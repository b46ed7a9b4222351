"""Explanations: evidence from the right items, the post-processing rules, and the metrics on hand-labelled sentences."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from recbole_llmalign.llm.explain import (
    Attribute,
    Evidence,
    HistoryMatch,
    ItemAttributes,
    LLMWriter,
    NoNewNames,
    TemplateWriter,
    clean_sentence,
    display_title,
    gather_evidence,
    infer_field_kind,
    name_tokens,
    nearest_history,
    repeated_phrase,
    short_title,
    stem,
)
from recbole_llmalign.llm.explain_metrics import distinct_2, grounded, hallucinated, perplexity, tautology
from tests.conftest import write_atomic

# A small movie catalog (internal ids; 0 = padding). Drama fills the rest, so no genre here is on more than half.
TITLES = ["", "Home Alone", "Heat", "Dumb & Dumber", "Toy Story", "Usual Suspects, The", "Unforgiven"] + \
         [f"Drama number {i}" for i in range(7, 14)]
GENRES = ["", "Comedy Children's", "Action Crime Thriller", "Comedy", "Animation Children's Comedy", "Crime Thriller",
          "Western"] + ["Drama"] * 7
HOME_ALONE, HEAT, DUMB, TOY_STORY, SUSPECTS, UNFORGIVEN = 1, 2, 3, 4, 5, 6
COMEDY = Attribute("class", "Comedy", "list")


@pytest.fixture
def movies() -> ItemAttributes:
    return ItemAttributes(TITLES, {"class": ("list", GENRES)})


def test_nearest_history_ranks_by_cosine_of_the_item_vectors():
    vectors = torch.tensor([[0.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0], [5.0, 0.0]])
    # item 5 points along x: 1 (almost x) before 3 (diagonal) before 2 (y) before 4 (-x); lengths do not matter
    assert [i for i, _ in nearest_history(vectors, [4, 2, 3, 1], 5, k=4)] == [1, 3, 2, 4]
    nearest = nearest_history(vectors, [0, 1, 1, 5, 3, 3], 5, k=3)  # padding, repeats and the item itself are skipped
    assert [i for i, _ in nearest] == [1, 3]
    assert nearest[0][1] == pytest.approx(0.9 / math.hypot(0.9, 0.1))
    assert nearest_history(vectors, [5], 5, k=2) == []


def test_evidence_comes_from_the_closest_history_items_and_what_they_really_share(movies):
    vectors = torch.zeros(len(TITLES), 2)
    vectors[DUMB] = torch.tensor([1.0, 0.0])
    vectors[HEAT] = torch.tensor([0.95, 0.05])  # closest by vectors, though it shares no genre with Dumb & Dumber
    vectors[HOME_ALONE] = torch.tensor([0.6, 0.4])
    vectors[UNFORGIVEN] = torch.tensor([-1.0, 0.0])
    tokens = [f"ext{i}" for i in range(len(TITLES))]
    [evidence] = gather_evidence(vectors, movies, [UNFORGIVEN, HOME_ALONE, HEAT], [DUMB], k=2, item_tokens=tokens)
    assert [m.index for m in evidence.history] == [HEAT, HOME_ALONE] and evidence.item_id == "ext3"
    assert [m.item_id for m in evidence.history] == ["ext2", "ext1"] and evidence.title == "Dumb & Dumber"
    assert evidence.history[0].shared == [] and COMEDY in evidence.history[1].shared
    assert [a.value for a in evidence.history[1].shared if a.kind == "list"] == ["Comedy"]  # not Children's: D&D is not
    assert evidence.shared == evidence.history[1].shared
    assert "Home Alone" in evidence.render() and "shares" in evidence.render()


def test_attributes_on_most_items_are_no_reason():
    titles = [""] + [f"Pen model {i}" for i in range(1, 7)]
    categories = ["", *["Office Products, Pens"] * 2, *["Office Products, Paper"] * 4]
    attributes = ItemAttributes(titles, {"categories": ("list", categories)})
    shared = attributes.shared(1, 2)
    assert [a.value for a in shared if a.kind == "list"] == ["Pens"]  # "Office Products": on every item
    assert "model" not in {a.value for a in shared}  # a word of every title is no reason either


def test_field_kinds_are_read_from_the_item_file(tmp_path):
    binders, folders = "Office & School Supplies, Binders", "Office & School Supplies, File Folders"
    rows = [["i1", "Avery Durable View Binder, White, 1 Inch Slant Rings (17012)", "Avery", binders,
             "Sturdy rings hold paper and keep every page in order for years of daily use."],
            ["i2", "Smead File Folder, Letter Size, Kraft, 100 per Box", "Smead", folders,
             "Kraft stock folders keep your papers sorted in any drawer or cabinet."],
            ["i3", "Avery Heavy-Duty Binder with Slant Rings for Paper", "Avery", binders, ""]]
    write_atomic(tmp_path / "shop" / "shop.item",
                 ["item_id:token", "title:token_seq", "brand:token_seq", "categories:token_seq", "description:token_seq"], rows)
    dataset = SimpleNamespace(config={"data_path": str(tmp_path / "shop")}, dataset_name="shop", iid_field="item_id",
                              item_num=4, field2token_id={"item_id": {"[PAD]": 0, "i1": 1, "i2": 2, "i3": 3}})
    config = {"item_text_fields": ["title", "brand", "categories", "description"], "explanation_attribute_fields": {}}
    attributes = ItemAttributes.from_dataset(dataset, config)
    assert Attribute("brand", "Avery", "value") in attributes.facts[3]
    assert Attribute("categories", "Binders", "list") in attributes.facts[3]
    assert stem("paper") in attributes.words[1] and stem("papers") in attributes.words[2]  # description words a title uses
    assert stem("sturdy") not in attributes.words[1] and stem("drawer") not in attributes.words[2]  # no product words
    assert attributes.titles[1] == "Avery Durable View Binder"
    with pytest.raises(ValueError, match="explanation_attribute_fields names"):
        ItemAttributes.from_dataset(dataset, {**config, "explanation_attribute_fields": {"colour": "value"}})
    genres = ["Comedy Children's", "Comedy", "Children's", "Action Thriller", "Action", "Thriller"]
    assert infer_field_kind(genres, "token_seq") == "list"  # ml-100k genres
    assert infer_field_kind(["1995", "1996"], "token") == "value"
    assert infer_field_kind(["Paper Mate", "Avery", "Post-it", "Paper Mate"], "token_seq") == "value"  # a brand is one name


def test_titles_as_a_person_writes_them():
    assert display_title("Usual Suspects, The") == "The Usual Suspects"
    assert display_title("Shanghai Triad (Yao a yao yao dao waipo qiao)") == "Shanghai Triad"
    assert display_title("AT&amp;T 210 Corded Phone") == "AT&T 210 Corded Phone"
    assert short_title("Kodak 8237216 10XL Ink Cartridge - Black") == "Kodak 10XL Ink Cartridge"
    assert short_title("Scotch® Removable Tape, 3/4 x 800 Inches") == "Scotch Removable Tape"


# ---- post-processing ----
def test_clean_sentence_keeps_one_capitalised_sentence_with_a_full_stop():
    titles = ["Home Alone", "Dr. Strangelove", "Dumb & Dumber"]
    assert clean_sentence("because you liked Home Alone, it is a comedy. It also stars", keep=titles) == \
        "Because you liked Home Alone, it is a comedy."
    assert clean_sentence("Like Dr. Strangelove, it is a satire by Mr. Kubrick and", keep=titles) == \
        "Like Dr. Strangelove, it is a satire by Mr. Kubrick."  # no split inside a title or after "Mr."
    assert clean_sentence("Sure! Here is why: **Dumb & Dumber** is silly fun for two", keep=titles) == \
        "Dumb & Dumber is silly fun for two."
    assert clean_sentence("a road trip of two friends!") == "A road trip of two friends."
    assert clean_sentence("Yes.") == "" and clean_sentence("") == ""


def test_clean_sentence_cuts_repeated_phrases():
    text = "It is a comedy like Home Alone and it is a comedy like Home Alone and it is"
    cleaned = clean_sentence(text, keep=["Home Alone"])
    assert cleaned == "It is a comedy like Home Alone." and not repeated_phrase(cleaned)
    assert repeated_phrase(text)
    assert clean_sentence("It is is a very very funny road movie") == "It is a very funny road movie."


def test_clean_sentence_drops_an_echo_of_the_prompt():
    prompt = "I liked Home Alone (Comedy) and Heat (Action). In one sentence, tell me why I may like Dumb & Dumber."
    written = "I liked Home Alone (Comedy) and Heat. Dumb & Dumber is a silly comedy, like Home Alone."
    assert clean_sentence(written, prompt=prompt, keep=["Home Alone", "Heat", "Dumb & Dumber"]) == \
        "Dumb & Dumber is a silly comedy, like Home Alone."
    assert clean_sentence("In one sentence, tell me why I may like Dumb & Dumber.", prompt=prompt,
                          keep=["Dumb & Dumber"]) == ""


def test_template_names_the_evidence():
    match = HistoryMatch("1", "Home Alone", 0.9, [COMEDY, Attribute("text", "alone", "word")], 1)
    other = HistoryMatch("2", "Heat", 0.8, [], 2)
    assert TemplateWriter.sentence(Evidence("3", "Dumb & Dumber", [match, other], 3)) == \
        "Because you liked Home Alone and Heat, also Comedy."
    assert TemplateWriter.sentence(Evidence("3", "Dumb & Dumber", [other], 3)) == "Because you liked Heat."
    assert TemplateWriter.sentence(Evidence("3", "Dumb & Dumber", [], 3, about=["Comedy"])) == \
        "Dumb & Dumber is a popular choice in Comedy."


def test_llm_writer_prompt_is_built_from_the_evidence():
    match = HistoryMatch("1", "Home Alone", 0.9, [COMEDY], 1)
    evidence = Evidence("3", "Dumb & Dumber", [match], 3, about=["Comedy"])
    writer = LLMWriter(None, SimpleNamespace(chat_template=None), "I liked {history}. Why {item} ({about})?",
                       "Like {liked}, {item}", 8)
    text, message = writer.prompt_text(evidence)
    assert message == "I liked Home Alone (Comedy). Why Dumb & Dumber (Comedy)?"
    assert text == message + "\nLike Home Alone, Dumb & Dumber"
    twin = Evidence("4", "Home Alone", [match], 4)  # another edition of the closest history item
    assert writer.fill(writer.opening, twin) == "Like Home Alone, this one"


def test_no_new_names_bans_capitalised_words_and_numbers_the_prompt_lacks():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "like", "is", "a", "Heat", "Acme", "42", "film"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>")
    prompts = torch.tensor([tokenizer("like Heat is a film")["input_ids"], tokenizer("Acme 42 film")["input_ids"] + [1, 1]])
    scores = NoNewNames(tokenizer, prompts)(prompts, torch.zeros(2, len(words)))
    banned = [{words[i] for i in torch.nonzero(row == -torch.inf).flatten().tolist()} for row in scores]
    assert banned == [{"Acme", "42"}, {"Heat"}]  # lower-case words are always free


# ---- metrics, against hand-labelled sentences (history: Home Alone, Heat; recommended: Dumb & Dumber) ----
LABELLED = [  # sentence, grounded, hallucinated, tautology
    ("Because you liked Home Alone and Heat, also Comedy.", True, False, False),
    ("Like Heat, it is fast.", True, False, False),
    ("Dumb & Dumber is a silly comedy about two friends.", True, False, False),  # Comedy: D&D's and Home Alone's
    ("Dumb & Dumber is a thriller.", False, False, False),  # a genre of Heat, not of D&D: not grounded, not invented
    ("They will enjoy Dumb & Dumber because they will enjoy it.", False, False, True),
    ("Dumb & Dumber is a great choice.", False, False, True),
    ("Like Toy Story, it is a comedy.", True, True, False),  # Toy Story is not in the history
    ("Like The Usual Suspects, a crime story.", False, True, False),
    ("Because you liked Home Alone, also a Western.", True, True, False),  # nobody here is a Western
    ("Because you liked Comical Family Fun, it is a road movie.", False, True, False),  # an invented title
]


@pytest.mark.parametrize("sentence, is_grounded, is_hallucinated, is_tautology", LABELLED)
def test_metrics_agree_with_hand_labels(movies, sentence, is_grounded, is_hallucinated, is_tautology):
    history = [HOME_ALONE, HEAT]
    assert grounded(sentence, DUMB, history, movies) is is_grounded
    assert hallucinated(sentence, DUMB, history, movies) is is_hallucinated
    assert tautology(sentence, TITLES[DUMB]) is is_tautology


def test_names_are_matched_as_names(movies):
    assert movies.mentions("a heat wave and the usual suspects").titles == []  # lower case: no title named
    assert set(movies.mentions("Heat, then The Usual Suspects").titles) == {frozenset({HEAT}), frozenset({SUSPECTS})}
    assert movies.mentions("comedies").attributes == [frozenset({COMEDY})]


def test_distinct_2_counts_bigrams_within_sentences():
    assert distinct_2(["a b c", "a b d"]) == pytest.approx(3 / 4)
    assert distinct_2(["same words here", "same words here"]) == pytest.approx(2 / 4)
    assert distinct_2(["one"]) == 0.0


def test_perplexity_pools_tokens_over_sentences_of_any_length(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    short, long = "the next movie", "user watched the item yes no the next movie"
    counts = {t: len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (short, long)}
    pooled = perplexity(lm, tokenizer, [short, long], batch_size=2)  # one padded batch
    alone = {t: perplexity(lm, tokenizer, [t]) for t in (short, long)}
    expected = math.exp(sum(math.log(alone[t]) * counts[t] for t in counts) / sum(counts.values()))
    assert pooled == pytest.approx(expected, rel=1e-4)
    assert alone[short] != pytest.approx(alone[long])


class _Vocabulary:
    """Just the two tokenizer calls ``name_tokens`` makes, over a fixed vocabulary."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def __len__(self) -> int:
        return len(self.pieces)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.pieces[i] for i in ids]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)


def test_name_tokens_are_cached_per_tokenizer_object_and_released_with_it() -> None:
    import gc

    from recbole_llmalign.llm import explain

    first, second = _Vocabulary(["the", " Fargo", "7", "cat"]), _Vocabulary([" Star", "wars", " Trek"])
    ids, texts = name_tokens(first)
    assert ids.tolist() == [1, 2] and texts == ["Fargo", "7"]
    assert name_tokens(first)[0] is ids  # cached
    ids, texts = name_tokens(second)
    assert ids.tolist() == [0, 2] and texts == ["Star", "Trek"]
    cached = len(explain._name_tokens)
    del first
    gc.collect()
    assert len(explain._name_tokens) == cached - 1  # no stale entry a new tokenizer at the same address could read
