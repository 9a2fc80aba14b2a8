"""covidcxr: COVID-19 detection on frontal chest X-rays, lung segmentation and similar-case search."""

__version__ = "0.1.0"
