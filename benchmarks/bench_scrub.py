"""Recall of the free-text scrubber on generated descriptions, the clinical words it keeps, its speed.

Generates ``--count`` realistic series/study descriptions (seeded): a description as scanners and
RIS write them (Siemens, GE, Philips, Canon protocol names, CT and US study descriptions, research
sessions) with identifiers planted in the forms people type them, and the truth of every planted
span recorded. Then, in one run:

  a) recall: the share of planted identifiers wholly replaced by :func:`sendit.deid.scrub.find`,
     per kind, and for names per source — names of the shipped lists (US Census, Faker), names
     *held out* of them (hand-written below, from languages whose lists are not shipped; the run
     counts which of them happen to be in the lists anyway), typing slips of listed names, and
     site acronyms;
  b) clinical words kept: the share of the descriptions' own words left untouched;
  c) throughput: descriptions per second of :func:`sendit.deid.scrub.scrub`, and its time against
     the floor's: splitting the same descriptions into words and joining them again.

Two template sets: the *tuned* one was used to complete the clinical word list (words it lost on a
first run were added); the *fresh* one was written afterwards and never used to change a list, so
its share of clinical words kept is the honest one.

    .venv/bin/python benchmarks/bench_scrub.py --count 2000 --seed 7
"""

from __future__ import annotations

import argparse
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field

from sendit.deid.scrub import find, fold, scrub, vocabulary

WORDS = re.compile(r"\w+")


def _split(text: str) -> list[str]:
    """Words of a wrapped literal (one word list, several source lines)."""
    return text.split()


#: Descriptions as devices and RIS write them: every word here is one the scrubber should keep.
TEMPLATES = """
t1_mprage_sag_p2_iso | t2_tse_tra_p2 | ep2d_diff_mddw_20_p2 | t2_space_dark-fluid_sag_p2_iso
AAHead_Scout_64ch-head-coil | localizer | gre_field_mapping | tof_fl3d_tra_p2_multi-slab
t1_vibe_fs_tra_bh_caipi | t2_haste_cor_bh | resting_state_fMRI_ep2d_bold | swi_tra_p2
t1_se_sag | t2_blade_tra_fs | pd_tse_fs_cor | t2_tirm_cor_dark-fluid | ep2d_perf_p2
Ax T2 FRFSE | Sag T1 FLAIR | 3-pl loc | ASSET cal | Ax DWI 1000b | SAG CUBE FLAIR | Ax T1 SE post
Cor T2 FS | Ax SWAN | 3D TOF | Ax LAVA Flex pre | Ax LAVA Flex delay | Sag CUBE T2 | Ax FIESTA
sT1W_3D_TFE | T2W_TSE | DWI_SENSE | SURVEY | FLAIR_longTR | T1W_FFE | 3D_TOF | T2_FFE | WIP ASL
Survey MST | sT2W_FLAIR | T1W_3D_TFE gado | DTI_high_iso | B0 map | T2W TSE COR | DWI b800
MR BRAIN W/WO CONTRAST | MR LUMBAR SPINE WO CONTRAST | MRI KNEE LEFT WITHOUT CONTRAST
MR ABDOMEN PELVIS WITH AND WITHOUT CONTRAST | MRCP | MR PROSTATE MULTIPARAMETRIC | MR HEART FUNCTION
MRA HEAD WO CONTRAST | MR SHOULDER RIGHT ARTHROGRAM | MR BREAST BILATERAL WITH CONTRAST
CT HEAD WO CONTRAST | CT CHEST ABDOMEN PELVIS WITH CONTRAST | CTA CHEST PE PROTOCOL | CT ANGIO HEAD NECK
CT ABDOMEN PELVIS WO CONTRAST RENAL STONE | CT CARDIAC CALCIUM SCORE | CT SINUS WO CONTRAST
CT CERVICAL SPINE WO CONTRAST | CT LUNG SCREENING LOW DOSE | CT PERFUSION BRAIN | CT WRIST LEFT
Topogram 0.6 T20s | Head 5.0 H40s | Recon 2: Lung 1.0 B70f | Thorax 1.0 Br40d | Abdomen 3.0 Br36
Bone 0.75 Qr60 | Patient Protocol | Dose Report | Smart Prep | Head Routine 4.8mm | Chest Routine
Body 5.0 | Lung 1.25mm | Soft Tissue 3mm | Axial 2.5mm Standard | Coronal MPR 3mm | Sagittal Bone
US ABDOMEN COMPLETE | US PELVIS TRANSVAGINAL | US THYROID | US CAROTID DOPPLER BILATERAL
US RENAL | US BREAST LEFT | ECHO TRANSTHORACIC | US OBSTETRIC SECOND TRIMESTER | US LIVER ELASTOGRAPHY
XR CHEST PA AND LATERAL | DR CHEST PA | XR KNEE 3 VIEWS RIGHT | XR HAND LEFT 2 VIEWS | XR PELVIS AP
MAMMO SCREENING BILATERAL | MG DIAGNOSTIC LEFT | PET CT WHOLE BODY FDG | NM BONE SCAN WHOLE BODY
func task-rest bold | anat T1w | dwi AP | fmap phasediff | perfusion pcasl | session 2 baseline
follow up brain tumour | research protocol memory study | phantom QA weekly | motion corrected
Brain Routine | Stroke protocol | Epilepsy protocol | MS protocol | Pituitary dynamic | Orbits fat sat
Cardiac cine short axis | LGE PSIR | T1 mapping MOLLI | 4 chamber cine | Aortic flow | Perfusion stress
""".replace("\n", "|").split("|")
TEMPLATES = [t.strip() for t in TEMPLATES if t.strip()]

#: Descriptions written after the word lists were last changed and never used to change them: the
#: honest measure of the clinical words kept (the first set was, for words the lists lacked).
FRESH_TEMPLATES = """
t1_fl2d_tra | t2_tse_sag_384 | ep2d_bold_moco_TR2000 | diff_mddw_12 | gre_t2star_tra
tfl_b1map | t1_space_sag_p2_iso_post | t2_tse_dixon_cor_W | cmrr_mbep2d_bold_mb8 | ToF_3D_multi-slab
Sag T2 CUBE | Ax 3D SPGR post | Ax DTI 30 dir | Cor STIR | Ax T1 FSE | Ax PD fat sat | Sag MAVRIC
DelRec - Ax T2 | PU:Ax DWI | ORIG Ax T1 post | Ax GRE | Calibration Scan | 3 Plane Localizer
VenBOLD | SWIp | T1W_mDIXON_TFE | 3DT1 | T2W_SPIR | PCA_MRA | MRV TOF | QFlow_BH_aorta
MR CERVICAL SPINE WITHOUT CONTRAST | MRI ORBITS FACE NECK W WO | MR ENTEROGRAPHY | MR ANKLE RIGHT
MR PELVIS FEMALE | MR CARDIAC STRESS PERFUSION | MR LIVER EOVIST | MR TEMPORAL LOBE EPILEPSY
CT ABD PELVIS W CONTRAST | CT FACIAL BONES | CT TEMPORAL BONES | CTA RUNOFF | CT COLONOGRAPHY
CT UROGRAM | CT KNEE RIGHT WITHOUT CONTRAST | CT PE STUDY | CT CORONARY ANGIO | CT THORAX HRCT
Thorax 1.0 B60f | Abdomen 5.0 B30f | Heart 0.75 Bv40 | iDose 3 | ASIR-V 40% | Mediastinum 3mm
Lung Window | Bone Window | MIP 10mm | VRT | Bolus Tracking | Arterial Phase | Portal Venous Phase
US ABD LIMITED | US SCROTUM | US SOFT TISSUE NECK | US LOWER EXTREMITY VENOUS DUPLEX LEFT
US FIRST TRIMESTER | US KIDNEY TRANSPLANT | US GUIDED BIOPSY | US HIP INFANT | US APPENDIX
XR ABDOMEN 1 VIEW | XR SPINE LUMBAR 2 VIEWS | XR FOOT RIGHT | XR SHOULDER LEFT | XR CHEST PORTABLE
PET/CT FDG ONCOLOGY | PET BRAIN AMYLOID | SPECT MYOCARDIAL PERFUSION | DXA BONE DENSITY
MAMMO TOMO SCREENING | MAMMO DIAGNOSTIC RIGHT | BREAST MRI SCREENING HIGH RISK
pre-op planning | post-op control | interval follow-up | second opinion | outside study import
research visit 2 | healthy volunteer | pilot scan | sequence test | QA phantom monthly
Schädel nativ | Thorax mit KM | Abdomen Becken KM | IRM cérébrale | Scanner thoracique injecté
""".replace("\n", "|").split("|")
FRESH_TEMPLATES = [t.strip() for t in FRESH_TEMPLATES if t.strip()]

#: Names written for this benchmark from languages whose lists Sendit does not ship (Lithuanian,
#: Latvian, Estonian, Icelandic, Irish, Welsh, Basque, Maltese, Albanian, Greek, Georgian,
#: Armenian, Arabic, Persian, Swahili, Yoruba, Igbo, Hausa, Zulu, Amharic, Thai, Malagasy, Tamil).
HELD_OUT = _split(
    "Kazlauskas Jankauskas Petrauskas Stankevičius Vasiliauskas Žukauskas Butkus Paulauskas Urbonas "
    "Kavaliauskas Mindaugas Rūta Eglė Gintarė Aušra Vytautas Giedrius Bērziņš Kalniņš Ozoliņš Liepiņš "
    "Krūmiņš Zariņš Pētersons Jānis Andris Ilze Inese Kristaps Gunta Tamm Saar Sepp Mägi Kask Kukk "
    "Rebane Ilves Pärn Koppel Tõnu Kadri Liis Urmas Maarja Jónsdóttir Sigurðsson Guðmundsdóttir "
    "Gunnarsson Ólafsson Einarsdóttir Sigríður Guðrún Þórunn Björk Hrafn Aoife Siobhán Niamh Caoimhe "
    "Oisín Tadhg Pádraig Gruffydd Llewelyn Cerys Dafydd Gwenllian Iolo Rhiannon Bethan Etxeberria "
    "Goikoetxea Agirre Urrutia Zubizarreta Iturralde Iñaki Itziar Aitor Nerea Ainhoa Unai Camilleri "
    "Farrugia Zammit Galea Grech Attard Hoxha Krasniqi Gashi Berisha Shala Arbër Dritan Blerina Elira "
    "Papadopoulos Nikolaidis Georgiou Konstantinidis Oikonomou Vlachos Eleftheria Dimitrios "
    "Panagiotis Vasiliki Beridze Kapanadze Gelashvili Maisuradze Tsiklauri Giorgi Levan Hovhannisyan "
    "Grigoryan Sargsyan Harutyunyan Anahit Tigran Narek Lilit Haddad Nasrallah Abdelrahman Benali "
    "Bouazizi Mansour Youssef Khadija Layla Hosseini Moradi Rezaei Karimi Jafari Ahmadi Shirin "
    "Dariush Parisa Kourosh Mwangi Otieno Njoroge Kamau Wanjiru Achieng Baraka Neema Zawadi Juma "
    "Adeyemi Okonkwo Nwachukwu Olawale Abubakar Chiamaka Oluwaseun Ngozi Adaeze Emeka Tunde Dlamini "
    "Nkosi Ndlovu Mthembu Khumalo Thandiwe Sipho Lindiwe Nomvula Tesfaye Bekele Gebremariam Alemu "
    "Abebe Meseret Tigist Yohannes Srisuk Chaiyaporn Wongsawat Suksawat Somchai Kanya Niran "
    "Rakotomalala Andriamanalina Randriamampionona Tuilagi Faleolo Subramanian Venkataraman "
    "Ramachandran Krishnamurthy Chakraborty Bhattacharya Lakshmi Harish Deepika"
)
SITES = _split("CHUV HUG USZ KSSG UKE LMU AKH LUMC UMCU AMC APHP HCL UZL KUL MGH BWH UCSF NYU UCLH KCL RMH")
TITLES = ["Dr", "Dr.", "DR.", "Prof", "Prof.", "Mr", "Mrs", "Ms", "Dott.", "Mme"]
LINKS = ["by", "for", "ref", "attn", "per", "read by", "requested by", "PI", "tech", "cc"]


@dataclass
class Sample:
    text: str = ""
    truth: list[tuple[int, int, str, str]] = field(default_factory=list)  # start, end, kind, source
    words: list[tuple[int, int]] = field(default_factory=list)  # the template's own words

    def add(self, piece: str, kind: str | None = None, source: str = "") -> None:
        if self.text:
            self.text += " "
        start = len(self.text)
        self.text += piece
        if kind is not None:
            self.truth.append((start, len(self.text), kind, source))

    def add_template(self, template: str) -> None:
        if self.text:
            self.text += " "
        offset = len(self.text)
        self.text += template
        self.words += [(offset + m.start(), offset + m.end()) for m in re.finditer(r"[^\W_]+", template)]


class Planter:
    """Identifiers as people type them, drawn from a seeded generator."""

    def __init__(self, rng: random.Random) -> None:
        vocab = vocabulary()
        self.rng = rng
        self.surnames = [w for w in sorted(vocab.surnames) if w.isalpha() and len(w) >= 3]
        self.given = [w for w in sorted(vocab.given) if w.isalpha() and len(w) >= 3]
        self.held_in_list = {n for n in HELD_OUT if vocab.is_name(fold(n))}

    def _cap(self, word: str) -> str:
        return self.rng.choice([word.capitalize(), word.upper(), word.capitalize()])

    def name(self) -> tuple[str, str]:
        """A person's name in one of the forms people type; the source of its words."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.55:
            source, last, first = "listed", rng.choice(self.surnames), rng.choice(self.given)
        elif roll < 0.85:
            last, first = rng.choice(HELD_OUT), rng.choice(HELD_OUT)
            listed = last in self.held_in_list or first in self.held_in_list
            source = "held-out-listed" if listed else "held-out-unlisted"
        else:  # a typing slip of a listed surname: one letter doubled, dropped or swapped
            source, last, first = (
                "slip",
                self._slip(rng.choice([s for s in self.surnames if len(s) >= 5])),
                rng.choice(self.given),
            )
        last, first = self._cap(last), self._cap(first)
        form = rng.randrange(7)
        if form == 0:
            return f"{rng.choice(TITLES)} {last}", source
        if form == 1:
            return f"{first} {last}", source
        if form == 2:
            return f"{last}^{first}", source
        if form == 3:
            return f"{last}, {first}", source
        if form == 4:
            return f"{first[0]}. {last}", source
        if form == 5:
            return f"{rng.choice(TITLES)} {first} {last}", source
        return last, source

    def _slip(self, word: str) -> str:
        i = self.rng.randrange(1, len(word) - 1)
        return self.rng.choice(
            [word[:i] + word[i] + word[i:], word[:i] + word[i + 1 :], word[:i] + word[i + 1] + word[i] + word[i + 2 :]]
        )

    def date(self) -> str:
        rng = self.rng
        y, m, d = rng.randrange(1990, 2026), rng.randrange(1, 13), rng.randrange(1, 29)
        months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        full = [
            "January",
            "February",
            "March",
            "April",
            "May",
            "June",
            "July",
            "August",
            "September",
            "October",
            "November",
            "December",
        ]
        forms = [
            f"{y}-{m:02d}-{d:02d}",
            f"{d:02d}/{m:02d}/{y}",
            f"{m}/{d}/{y % 100:02d}",
            f"{d}.{m}.{y}",
            f"{y}{m:02d}{d:02d}",
            f"{d} {months[m - 1]} {y}",
            f"{full[m - 1]} {d}, {y}",
            f"{d:02d}-{months[m - 1].upper()}-{y}",
            f"{months[m - 1]} {y}",
            f"{m:02d}/{y}",
            f"{y}.{m:02d}.{d:02d}",
            f"{d}{['st', 'nd', 'rd', 'th'][min(d, 4) - 1]} {full[m - 1]}",
            f"{y}-{m:02d}-{d:02d}T{rng.randrange(24):02d}:{rng.randrange(60):02d}",
        ]
        return rng.choice(forms)

    def identifier(self) -> str:
        rng = self.rng
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randrange(6, 10)))
        forms = [
            f"MRN {digits}",
            f"MRN:{digits}",
            f"ID {digits}",
            f"#{digits}",
            digits,
            f"A{digits}",
            f"PID-{digits[:7]}",
            f"Acc {digits}",
            f"sub-{digits[:3]}",
            f"{digits[:3]}-{digits[3:5]}-{rng.randrange(10**4):04d}",
            f"pt {digits[:4]}",
            f"{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{digits[:6]}",
        ]
        return rng.choice(forms)

    def phone(self) -> str:
        rng = self.rng
        n = lambda k: "".join(rng.choice("0123456789") for _ in range(k))  # noqa: E731
        forms = [
            f"+41 21 {n(3)} {n(2)} {n(2)}",
            f"({n(3)}) {n(3)}-{n(4)}",
            f"{n(3)}-{n(3)}-{n(4)}",
            f"tel {n(4)}",
            f"ext. {n(4)}",
            f"0{n(2)} {n(3)} {n(2)} {n(2)}",
            f"+1 {n(3)} {n(3)} {n(4)}",
            f"bip {n(3)}",
            f"{n(3)}-{n(4)}",
            f"Tel: 0{n(3)} {n(6)}",
        ]
        return rng.choice(forms)

    def email(self) -> str:
        first, last = self.rng.choice(self.given), self.rng.choice(HELD_OUT + self.surnames[:2000])
        domain = self.rng.choice(["chuv.ch", "hospital.org", "uni-example.de", "mail.com", "med.example.edu"])
        return f"{fold(first)}.{fold(last)}@{domain}"


def generate(count: int, seed: int, templates: list[str]) -> tuple[list[Sample], Planter]:
    rng = random.Random(seed)
    planter = Planter(rng)
    samples = []
    for _ in range(count):
        sample = Sample()
        sample.add_template(rng.choice(templates))
        for _plant in range(rng.randrange(1, 4)):
            kind = rng.choices(["name", "date", "id", "phone", "email", "site"], weights=[5, 3, 2, 1, 1, 1])[0]
            if kind == "name":
                if rng.random() < 0.3:
                    sample.add(rng.choice(LINKS))
                text, source = planter.name()
                sample.add(text, "name", source)
            elif kind == "date":
                sample.add(planter.date(), "date")
            elif kind == "id":
                sample.add(planter.identifier(), "id")
            elif kind == "phone":
                sample.add(planter.phone(), "phone")
            elif kind == "email":
                sample.add(planter.email(), "email")
            else:
                sample.add(rng.choice(SITES), "site")
            if rng.random() < 0.3:
                sample.add_template(rng.choice(templates))
        samples.append(sample)
    return samples, planter


def _caught(text: str, start: int, end: int, covered: list[bool]) -> bool:
    """Every letter and digit of the planted span is inside a finding."""
    return all(covered[i] for i in range(start, end) if text[i].isalnum() and not _is_label(text, start, i))


_LABELS = re.compile(r"^(?:MRN:?|ID|Acc|PID-|pt|sub-|tel|ext\.|bip|Tel:|Dr\.?|DR\.|Prof\.?|Mrs?|Ms|Dott\.|Mme)\s?")


def _is_label(text: str, start: int, index: int) -> bool:
    """The label before a planted value (``MRN``, ``tel``, ``Dr``) may stay: it identifies nobody."""
    label = _LABELS.match(text[start:])
    return label is not None and index < start + label.end()


def measure(title: str, samples: list[Sample], planter: Planter, show: int) -> None:
    """Recall per kind and source, clinical words kept, throughput: one block of the report."""
    planted: Counter[str] = Counter()
    caught: Counter[str] = Counter()
    misses: list[str] = []
    lost: Counter[str] = Counter()
    kept = total_words = 0
    for sample in samples:
        covered = [False] * len(sample.text)
        for finding in find(sample.text):
            for i in range(finding.start, finding.end):
                covered[i] = True
        for start, end, kind, source in sample.truth:
            label = f"{kind}:{source}" if source else kind
            planted[label] += 1
            if _caught(sample.text, start, end, covered):
                caught[label] += 1
            else:
                misses.append(f"{sample.text[start:end]!r} in {sample.text!r}")
        for start, end in sample.words:
            total_words += 1
            if any(covered[start:end]):
                lost[sample.text[start:end]] += 1
            else:
                kept += 1

    started = time.perf_counter()
    for sample in samples:
        scrub(sample.text)
    elapsed = time.perf_counter() - started
    started = time.perf_counter()
    for sample in samples:
        " ".join(WORDS.findall(sample.text))
    baseline = time.perf_counter() - started

    all_planted, all_caught = sum(planted.values()), sum(caught.values())
    print(f"== {title}: {len(samples)} descriptions, {all_planted} planted identifiers")
    for label in sorted(planted):
        print(f"  {label:<22} {caught[label]:>5}/{planted[label]:<5} recall {caught[label] / planted[label]:.4f}")
    print(f"  recall of planted identifiers: {all_caught / all_planted:.4f}")
    print(f"  clinical words kept: {kept}/{total_words} = {kept / total_words:.4f}")
    print(
        f"  throughput: {len(samples) / elapsed:,.0f} descriptions/s ({elapsed * 1e6 / len(samples):.0f} µs each); "
        f"{elapsed / baseline:.1f}x the floor (splitting into words and joining them)"
    )
    for miss in misses[:show]:
        print("  missed:", miss)
    if lost:
        print("  clinical words lost (count):", ", ".join(f"{w} ({n})" for w, n in lost.most_common(show)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="descriptions per template set")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--show-misses", type=int, default=10)
    args = parser.parse_args()

    started = time.perf_counter()
    vocabulary()
    print(f"word lists loaded in {time.perf_counter() - started:.2f} s (once per process)")
    for title, templates in (("tuned set", TEMPLATES), ("fresh set", FRESH_TEMPLATES)):
        samples, planter = generate(args.count, args.seed, templates)
        measure(f"{title} (seed {args.seed})", samples, planter, args.show_misses)
    print(f"held-out names that are in the shipped lists anyway: {len(planter.held_in_list)}/{len(HELD_OUT)}")
    hostile()


def hostile() -> None:
    """The slowest of long values built to make a regular expression backtrack (20,000 characters)."""
    worst, which = 0.0, ""
    for piece in ("1.", "a.", "x.", "a^", "1 ", "+1 ", "Jan ", "tel ", "MRN ", "a-b.c@", "www.a/", "Dr a "):
        value = piece * (20_000 // len(piece)) + "@x"
        started = time.perf_counter()
        scrub(value)
        elapsed = time.perf_counter() - started
        if elapsed > worst:
            worst, which = elapsed, piece
    print(f"hostile 20,000-character values: slowest {worst * 1000:.0f} ms ({which!r} repeated)")


if __name__ == "__main__":
    main()
