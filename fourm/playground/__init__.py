"""The any-to-any playground: a local web page to try every direction of a trained model
(``launch/playground.py``)."""
