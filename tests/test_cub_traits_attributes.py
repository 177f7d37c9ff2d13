"""Parsing CUB attribute files: extra fields, certainty filter, clear errors with file and line."""

import numpy as np
import pytest
from eval_helpers import write_attribute_files

from traitsae.data.images.cub_attributes import load_cub_attributes
from traitsae.errors import TraitsaeError

NAMES = ["has_bill_shape::curved", "has_wing_color::blue", "has_eye_color::red"]


def test_labels_follow_is_present_and_certainty(tmp_path):
    present_NT = np.array([[1, 0, 1], [0, 1, 1]], dtype=bool)
    root = write_attribute_files(tmp_path, NAMES, np.array([3, 7]), present_NT)
    # Image 7's third attribute is only a guess (certainty 2): absent by default.
    path = root / "attributes" / "image_attribute_labels.txt"
    lines = path.read_text().splitlines()
    lines[5] = "7 3 1 2 4.0"
    path.write_text("\n".join(lines) + "\n")

    attrs = load_cub_attributes(root)
    assert attrs.names == NAMES
    labels_NT = attrs.labels(["7", "3"])  # store order, ids as strings
    np.testing.assert_array_equal(labels_NT, [[0, 1, 0], [1, 0, 1]])
    np.testing.assert_array_equal(attrs.labels([7], certainties=[2, 3, 4]), [[0, 1, 1]])
    assert attrs.certainty_IT[7, 2] == 2


def test_synthetic_generator_files_parse(tmp_path):
    from traitsae.data.synthetic import generate, trait_names

    root = generate(tmp_path / "synthetic", seed=0, n_species=3, images_per_species=4, size=32)
    attrs = load_cub_attributes(root)
    assert attrs.names == trait_names()
    labels_NT = attrs.labels(range(1, 13), certainties=[4])
    assert labels_NT.shape == (12, len(trait_names()))
    assert labels_NT.any(axis=1).all()  # every synthetic bird shows at least one trait


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("12 1 1", "line 4: expected '<image id> <attribute id>"),
        ("12 x 1 4 2.0", "line 4: expected '<image id> <attribute id>"),
        ("12 9 1 4 2.0", r"line 4: expected image id >= 1, attribute id in 1..3"),
        ("12 1 1 7 2.0", "certainty in 1..4"),
    ],
)
def test_malformed_label_lines_name_file_and_line(tmp_path, line, message):
    root = write_attribute_files(tmp_path, NAMES, np.array([11]), np.ones((1, 3), dtype=bool))
    path = root / "attributes" / "image_attribute_labels.txt"
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(TraitsaeError, match=message) as err:
        load_cub_attributes(root)
    assert str(path) in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(TraitsaeError, match="not a directory"):
        load_cub_attributes(tmp_path / "nowhere")
    with pytest.raises(TraitsaeError, match="attribute names not found"):
        load_cub_attributes(tmp_path)
    (tmp_path / "attributes.txt").write_text("1 a\n3 c\n")
    with pytest.raises(TraitsaeError, match=r"attributes.txt, line 2"):
        load_cub_attributes(tmp_path)
    (tmp_path / "attributes.txt").write_text("1 a\n")
    with pytest.raises(TraitsaeError, match="image_attribute_labels.txt"):
        load_cub_attributes(tmp_path)


def test_image_ids_without_annotations_are_an_error(tmp_path):
    root = write_attribute_files(tmp_path, NAMES, np.array([1, 2]), np.ones((2, 3), dtype=bool))
    attrs = load_cub_attributes(root)
    with pytest.raises(TraitsaeError, match=r"CUB ids \[5\]"):
        attrs.labels([1, 5])
    with pytest.raises(TraitsaeError, match="integers"):
        attrs.labels(["a"])
