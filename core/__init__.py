"""VisionLens engine: store, ingest, cohorts, matching, metrics, explanations. No Streamlit here."""

__version__ = "0.1.0"
