"""Hospital integration over DICOMweb: read studies from a PACS, write results back into the same study.

``client`` (QIDO-RS / WADO-RS / STOW-RS with ``dicomweb-client``, credentials, retries), ``ledger`` (SQLite record
of processed instances: idempotent, resumable runs) and ``runner`` (the run and watch loops). The result objects
themselves are built in :mod:`covidcxr.service.dicom_results`, shared with ``covidcxr predict --dicom-out``.
"""
