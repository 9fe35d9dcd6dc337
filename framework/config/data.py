"""``data.*``: which files, in which format, cut to which length, packed or not (conf/data/*.yaml)."""

from __future__ import annotations

import dataclasses

from framework.config.checks import one_of

#: data.format: one record per line of prompt/completion, chat messages, seq2seq (encoder-decoder models;
#: prompt_completion records are read as seq2seq for them) or preference pairs (DPO)
FORMATS = ("prompt_completion", "messages", "seq2seq", "preference")
#: data.truncation_side: which end of a too-long prompt is cut
TRUNCATION_SIDES = ("left", "right")
#: data.loss_on (chat): which assistant turns carry the loss
LOSS_ON = ("assistant", "last", "all")
#: data.bad_records (preference pairs): stop at the first bad record, or skip and count it
BAD_RECORDS = ("error", "skip")


def given(value):
    """A path key's value, with null and "" both meaning "not given"."""
    return None if value is None or value == "" else value


@dataclasses.dataclass
class DataSection:
    format: str = "prompt_completion"
    train: str | None = None
    validation: str | None = None          # a validation file, or null with validation_split
    validation_split: float | None = None  # that fraction of train held out (by seed)
    test: str | None = None                # evaluated once after training
    max_length: int = 512
    truncation_side: str = "left"
    decoder_max_length: int | None = None  # encoder-decoder models: the labels' bound (null: max_length)
    loss_on: str = "assistant"
    bad_records: str = "error"
    chat_template: str | None = None
    packing: bool = False
    cache_dir: str | None = None

    @staticmethod
    def option_problems(max_length, truncation_side: str, data_format: str, loss_on: str) -> list[str]:
        """The options no file could satisfy (also checked where a library function takes them as arguments)."""
        out = [one_of("data.truncation_side", truncation_side, TRUNCATION_SIDES),
               one_of("data.format", data_format, FORMATS), one_of("data.loss_on", loss_on, LOSS_ON)]
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            out.insert(0, f"data.max_length: expected an integer >= 2 (room for a token and eos), got {max_length!r}")
        return [p for p in out if p]

    def problems(self, require_validation: bool = True) -> list[str]:
        """``require_validation``: training needs exactly one validation source (a file or a split)."""
        out = self.option_problems(self.max_length, self.truncation_side, self.format, self.loss_on)
        out.append(one_of("data.bad_records", self.bad_records, BAD_RECORDS))
        validation, split = given(self.validation), self.validation_split
        if validation is not None and split is not None:
            out.append(f"data.validation={validation!r} and data.validation_split={split!r} are both set: give "
                       "exactly one (a validation file, or the fraction of data.train to hold out)")
        elif require_validation and validation is None and split is None:
            out.append("data.validation and data.validation_split are both unset: give exactly one, a validation "
                       "file (data.validation=FILE) or a fraction of data.train to hold out "
                       "(data.validation_split=0.05)")
        if split is not None and not 0 < split < 1:
            out.append(f"data.validation_split={split!r}: expected a fraction strictly between 0 and 1, e.g. 0.05")
        if self.decoder_max_length is not None and self.decoder_max_length < 2:
            out.append(f"data.decoder_max_length={self.decoder_max_length!r}: expected an integer >= 2 or null")
        return [p for p in out if p]
