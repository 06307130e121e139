import pytest
import torch

from labutils.models import Encoder, count_parameters, make_encoder


@pytest.mark.parametrize("capacity", ["small", "classic", "large"])
def test_encoder_output_shape(capacity):
    model = make_encoder(capacity)
    out = model(torch.zeros(3, 1, 28, 28))
    assert out.shape == (3, model.embedding_dim)


def test_classic_encoder_parameter_count():
    # conv 1->64 and 64->128 (3x3), 6272->512 hidden, 512->128 embedding, each with a bias.
    expected = (9 * 64 + 64) + (9 * 64 * 128 + 128) + (128 * 7 * 7 * 512 + 512) + (512 * 128 + 128)
    assert count_parameters(make_encoder("classic")) == expected


def test_capacities_ordered():
    sizes = [count_parameters(make_encoder(c)) for c in ("small", "classic", "large")]
    assert sizes == sorted(sizes)


def test_normalized_embeddings_unit_length():
    model = make_encoder("small", normalize=True)
    out = model(torch.randn(5, 1, 28, 28))
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-5)


def test_embedding_can_be_negative():
    torch.manual_seed(0)
    out = make_encoder("small")(torch.randn(16, 1, 28, 28))
    assert (out < 0).any()


def test_encoder_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        make_encoder("small")(torch.zeros(2, 3, 28, 28))


def test_encoder_rejects_zero_embedding():
    with pytest.raises(ValueError, match="embedding_dim"):
        Encoder(embedding_dim=0)


def test_unknown_capacity():
    with pytest.raises(ValueError, match="small, classic, large"):
        make_encoder("huge")
