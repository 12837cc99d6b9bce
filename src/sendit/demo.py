"""A synthetic data set with realistic PHI, for the demo run, the tests and the benchmarks.

Every identifying value here is invented. The files are valid DICOM with pixel data, nested
sequences and private tags, so that they exercise the same paths as an archive's export.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
}
UID_ROOT = "1.2.826.0.1.3680043.10.1078."

FIRST = ["Maria", "John", "Aiko", "Omar", "Ingrid", "Carlos", "Fatima", "Liam", "Chen", "Olga"]
LAST = ["Garcia", "Smith", "Tanaka", "Haddad", "Larsen", "Silva", "Khan", "Murphy", "Wei", "Petrova"]
BODY = {
    "CT": ("CHEST", "CT CHEST W CONTRAST"),
    "MR": ("BRAIN", "MRI BRAIN WO"),
    "US": ("ABDOMEN", "US ABDOMEN COMPLETE"),
    "CR": ("CHEST", "XR CHEST 2 VIEWS"),
}


@dataclass(frozen=True)
class Study:
    """Study-level values shared by every series of one study."""

    study_uid: str
    frame_of_reference_uid: str
    first_image_uid: str
    date: str
    time: str
    accession: str
    study_id: str
    referring: str

    @classmethod
    def fresh(
        cls,
        rng: random.Random,
        *,
        study_id: str,
        date: str = "20240105",
        time: str = "101010",
        accession: str = "",
        referring: str = "Doe^John^^Dr",
    ) -> Study:
        """A study with new UIDs (and a random accession number unless one is given)."""
        return cls(
            study_uid=generate_uid(prefix=UID_ROOT),
            frame_of_reference_uid=generate_uid(prefix=UID_ROOT),
            first_image_uid=generate_uid(prefix=UID_ROOT),
            date=date,
            time=time,
            accession=accession or f"A{rng.randint(10000000, 99999999)}",
            study_id=study_id,
            referring=referring,
        )


@dataclass(frozen=True)
class Patient:
    patient_id: str
    name: str
    birth_date: str
    sex: str
    address: str
    phone: str


def make_patient(rng: random.Random, index: int) -> Patient:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    return Patient(
        patient_id=f"MRN{rng.randint(1000000, 9999999)}",
        name=f"{last}^{first}^{chr(65 + index % 26)}",
        birth_date=f"{rng.randint(1930, 2015)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
        sex=rng.choice("MF"),
        address=f"{rng.randint(1, 999)} {rng.choice(LAST)} Street, Springfield",
        phone=f"555-{rng.randint(1000, 9999)}",
    )


def make_image(
    patient: Patient,
    study: Study,
    series_uid: str,
    series_number: int,
    modality: str,
    instance: int,
    size: int,
    rng: np.random.Generator,
) -> Dataset:
    """One image of a series; ``study`` carries the study-level values shared by its series."""
    sop_uid = generate_uid(prefix=UID_ROOT)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(SOP_CLASSES[modality])
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(UID_ROOT + "1")
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = SOP_CLASSES[modality]
    ds.SOPInstanceUID = sop_uid
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        setattr(ds, keyword, study.date)
    ds.StudyTime = study.time
    ds.SeriesTime = study.time
    ds.ContentTime = study.time
    ds.AccessionNumber = study.accession
    ds.Modality = modality
    ds.Manufacturer = "ACME Medical"
    ds.InstitutionName = "Springfield General Hospital"
    ds.InstitutionAddress = "1 Hospital Way, Springfield"
    ds.ReferringPhysicianName = study.referring
    ds.StationName = "SGH-" + modality + "01"
    ds.StudyDescription = BODY[modality][1]
    ds.SeriesDescription = f"{BODY[modality][0]} series {series_number}"
    ds.OperatorsName = "Tech^Pat"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{max(1, int(study.date[:4]) - int(patient.birth_date[:4])):03d}Y"
    ds.PatientAddress = patient.address
    ds.PatientTelephoneNumbers = patient.phone
    ds.OtherPatientIDs = "OLD" + patient.patient_id
    ds.BodyPartExamined = BODY[modality][0]
    ds.DeviceSerialNumber = "SN-48213"
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.ImagePositionPatient = [0.0, 0.0, float(instance)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness = 1.0
    ds.PixelSpacing = [0.7, 0.7]
    ref = Dataset()
    ref.ReferencedSOPClassUID = SOP_CLASSES[modality]
    ref.ReferencedSOPInstanceUID = study.first_image_uid
    ds.ReferencedImageSequence = Sequence([ref])
    request = Dataset()
    request.RequestedProcedureID = study.accession
    request.ScheduledProcedureStepID = "SPS" + study.study_id
    request.RequestingPhysician = study.referring
    ds.RequestAttributesSequence = Sequence([request])
    block = ds.private_block(0x0009, "ACME PRIVATE", create=True)
    block.add_new(0x10, "LO", patient.name)
    block.add_new(0x11, "LO", patient.patient_id)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = size
    ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if modality == "US":
        ds.BurnedInAnnotation = "NO"  # synthetic pixels: no text (ultrasound without it is quarantined)
    if modality == "CT":
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.KVP = 120
    pixels = rng.integers(0, 4096, size=(size, size), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    return ds


def _studies(rng: random.Random, patients: int) -> Iterator[tuple[Patient, Study, list[str]]]:
    modalities = ["CT", "MR", "US", "CR"]
    for p in range(patients):
        patient = make_patient(rng, p)
        for s in range(1 + p % 2):
            study = Study(
                study_uid=generate_uid(prefix=UID_ROOT),
                frame_of_reference_uid=generate_uid(prefix=UID_ROOT),
                first_image_uid=generate_uid(prefix=UID_ROOT),
                date=f"20{rng.randint(18, 25)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
                time=f"{rng.randint(7, 19):02d}{rng.randint(0, 59):02d}{rng.randint(0, 59):02d}",
                accession=f"A{rng.randint(10000000, 99999999)}",
                study_id=str(rng.randint(100, 999)),
                referring=f"{rng.choice(LAST)}^{rng.choice(FIRST)}^^Dr",
            )
            modality = modalities[(p + s) % len(modalities)]
            series_count = 2 if modality in ("CT", "MR") else 1
            yield patient, study, [modality] * series_count


def generate_demo(
    out_dir: Path, patients: int = 3, images_per_series: int = 8, size: int = 128, seed: int = 7
) -> list[Path]:
    """Write one complete folder per study under ``out_dir`` with the producer's ``.tmp`` rename.

    Folders are nested (study/series) to show that grouping goes by SeriesInstanceUID, not by folder.
    """
    rng = random.Random(seed)
    pixels = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for number, (patient, study, series_modalities) in enumerate(_studies(rng, patients), start=1):
        final = out_dir / f"ST-{number:06d}"
        partial = out_dir / f"ST-{number:06d}.tmp{rng.randint(1000, 9999)}"
        files: list[Path] = []
        for series_number, modality in enumerate(series_modalities, start=1):
            series_uid = generate_uid(prefix=UID_ROOT)
            folder = partial / f"series{series_number}"
            folder.mkdir(parents=True, exist_ok=True)
            for instance in range(1, images_per_series + 1):
                ds = make_image(patient, study, series_uid, series_number, modality, instance, size, pixels)
                path = folder / f"IM{instance:05d}.dcm"
                ds.save_as(path, enforce_file_format=True)
                files.append(path)
        os.rename(partial, final)
        written.extend(final / path.relative_to(partial) for path in files)
    return written
