"""Reading ``/metrics`` in tests: every sample by name and labels, parsed by prometheus-client's own parser."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

Key = tuple[str, frozenset[tuple[str, str]]]


class Scrape:
    """One ``/metrics`` text: ``value(name, **labels)`` reads a sample; ``series(name)`` all of a family's."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[Key, float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float | None:
        """The sample ``name`` with exactly these labels; None when there is none."""
        return self.samples.get((name, frozenset(labels.items())))

    def series(self, name: str, **having: str) -> dict[frozenset[tuple[str, str]], float]:
        """Every sample named ``name`` whose labels include ``having``."""
        return {
            labels: value
            for (sample, labels), value in self.samples.items()
            if sample == name and set(having.items()) <= labels
        }

    def total(self, name: str, **having: str) -> float:
        return sum(self.series(name, **having).values())

    def labels_of(self, name: str, label: str) -> set[str]:
        return {dict(labels)[label] for labels in self.series(name) if label in dict(labels)}


def gauges_not_negative(scrape: Scrape) -> list[str]:
    """The samples of gauge families that are below 0 (there must be none)."""
    return [
        f"{name}{dict(labels)}={value}"
        for (name, labels), value in scrape.samples.items()
        if scrape.types.get(name) == "gauge" and value < 0
    ]


def label_values(scrape: Scrape) -> set[str]:
    """Every label value in the scrape."""
    return {value for (_, labels) in scrape.samples for _, value in labels}


def only(mapping: Mapping[frozenset[tuple[str, str]], float]) -> float:
    [value] = mapping.values()
    return value
