import open_clip
import pytest
import torch

from megapgs.data.tokenizer import Tokenizer
from megapgs.models.text import eot_lengths


def test_tiny_arch_tokens_and_lengths():
    tokenize = Tokenizer("tiny-32")
    assert tokenize.context_length == 16
    tokens_BC, lengths = tokenize(["hello world", "a photo of a dress.", "été à la plage"])
    assert tokens_BC.shape == (3, 16) and tokens_BC.dtype == torch.int64 and tokens_BC.device.type == "cpu"
    assert lengths == [4, 8, lengths[2]] and lengths[2] > 3
    for row, length in zip(tokens_BC, lengths):
        assert row[0] == 49406 and row[length - 1] == tokenize.eot_token_id == 49407
        assert (row[length:] == 0).all() and (row[1:length - 1] < 49406).all()


def test_long_caption_is_cut_with_eot_last():
    tokens_BC, lengths = Tokenizer("tiny-28")(["word " * 50, "short"])
    assert lengths == [16, 3] and tokens_BC[0, -1] == 49407
    assert lengths == eot_lengths(tokens_BC).tolist()


def test_openclip_arch_matches_openclip_tokenize():
    captions = ["a diagram", "a dog", "a cat sitting on a mat, photographed at dusk"]
    tokens_BC, lengths = Tokenizer("ViT-B-32")(captions)
    assert torch.equal(tokens_BC, open_clip.tokenize(captions))  # OpenCLIP's own, 77 tokens
    assert lengths == [4, 4, 12]


def test_one_string_is_refused():
    with pytest.raises(TypeError, match="list of captions"):
        Tokenizer("tiny-32")("a caption")
