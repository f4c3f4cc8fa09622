from fersynth import classes


def test_canonical_order_is_rafdb_order():
    assert classes.CLASSES == ("surprise", "fear", "disgust", "happy", "sad", "angry", "neutral")
    assert [classes.RAFDB_LABELS[i] for i in range(1, 8)] == list(classes.CLASSES)


def test_every_source_maps_onto_the_seven_classes():
    for mapping in (classes.FER2013_LABELS, classes.AFFECTNET_LABELS, classes.FERPLUS_LABELS):
        assert sorted(mapping.values()) == sorted(classes.CLASSES)


def test_source_specific_numbers():
    assert classes.FER2013_LABELS[0] == "angry" and classes.FER2013_LABELS[6] == "neutral"
    assert classes.AFFECTNET_LABELS[0] == "neutral" and classes.AFFECTNET_LABELS[6] == "angry"
    assert set(classes.AFFECTNET_EXCLUDED) == {7, 8, 9, 10}
    assert classes.FERPLUS_VOTE_COLUMNS[-2:] == ("unknown", "NF")


def test_folder_aliases():
    assert classes.folder_class("Happiness") == "happy"
    assert classes.folder_class("anger") == "angry"
    assert classes.folder_class("4") is None  # numbers are never guessed: a class map names them
    assert classes.CLASS_MAP_PRESETS["rafdb"]["4"] == "happy"
    assert classes.CLASS_MAP_PRESETS["affectnet-alphabetical"]["1"] == classes.EXCLUDE  # contempt
    assert classes.folder_class("contempt") is None
    assert classes.class_index("neutral") == 6
