"""Text and token data: how a sequence starts (:mod:`.sequences`, from the tokenizer's own
convention), the UD treebanks (:mod:`.ud`), the one copy of the word lists (:mod:`.words`) and
what is installed (:mod:`.status`). ``speech_words.npz`` (package data) holds the speech battery's
recorded words.
"""
