"""ProtCryocvRefine: gold-standard 3D refinement (global branch-and-bound pose search,
NU or uniform regularization) with the ``cryocv refine`` CLI."""
import json
import os
import shutil

import pyworkflow.protocol.params as params
from pwem.constants import ALIGN_NONE, ALIGN_PROJ
from pwem.objects import FSC, SetOfParticles, Volume
from pwem.protocols import ProtRefine3D

from cryocv.jobs import jobdir
from cryocv.jobs.refine import RefineParams

from .protocol_base import CryocvProtocolBase, copyAlignment, setVoxelSize

REGULARIZERS = ["nu", "uniform"]
REFERENCE_MRC = "reference.mrc"        # the input reference, in extra/
ARGS_JSON = "refine_args.json"         # the arguments the job was started with, in extra/


class ProtCryocvRefine(CryocvProtocolBase, ProtRefine3D):
    """Gold-standard 3D refinement of particles against a low-resolution reference.

    Each half-set is refined independently: global pose search by coarse-to-fine
    branch-and-bound (Punjani et al. 2017) and, by default, non-uniform
    regularization, a per-voxel low-pass chosen by cross-validation between
    quarter-maps (Punjani, Zhang & Fleet 2020). Half-sets come from the input's
    _rlnRandomSubset when every particle has one, else from a seeded random split.
    """
    _label = "3D refinement (NU)"
    _possibleOutputs = {"outputVolume": Volume, "outputParticles": SetOfParticles, "outputFSC": FSC}

    # -------------------------- DEFINE param functions ----------------------
    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles", important=True,
                      label="Input particles", help="Particles with CTF; an existing alignment is not needed "
                                                    "(the search is global) but its change is reported.")
        form.addParam("referenceVolume", params.PointerParam, pointerClass="Volume", important=True,
                      label="Reference volume", help="Starting map, same box and pixel size as the particles; "
                                                     "it is low-passed to the initial resolution.")
        self._defineSymmetryParam(form)
        form.addSection(label="Refinement")
        form.addParam("regularizer", params.EnumParam, choices=["non-uniform (NU)", "uniform"],
                      default=REGULARIZERS.index(RefineParams.regularizer),
                      display=params.EnumParam.DISPLAY_HLIST, label="Regularizer",
                      help="NU: per-voxel low-pass chosen by cross-validation (best for membrane proteins in "
                           "micelles or flexible parts). Uniform: one FSC-derived Wiener filter.")
        form.addParam("initialLowpass", params.FloatParam, default=RefineParams.initial_lowpass_A, label="Initial low-pass (Å)",
                      help="The reference is low-passed to this resolution before the first iteration.")
        form.addParam("maxIterations", params.IntParam, default=RefineParams.max_iterations, label="Maximum iterations",
                      help="Refinement stops earlier when resolution and pose changes stop improving; a final "
                           "pass to Nyquist follows either way.")
        form.addParam("maxShift", params.FloatParam, default=-1, label="Maximum shift (Å)",
                      expertLevel=params.LEVEL_ADVANCED, help="Search range of origins; -1: 10% of the box.")
        form.addParam("seed", params.IntParam, default=RefineParams.seed, label="Random seed", expertLevel=params.LEVEL_ADVANCED,
                      help="Seed of the half-set split (when the input has none).")
        self._defineComputeParams(form)

    # -------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep)
        self._insertFunctionStep(self.refineStep, self._refineArgs())
        self._insertFunctionStep(self.createOutputStep)

    def _refineArgs(self):
        """``cryocv refine`` arguments of the form's values (step argument: an edited form reruns the step)."""
        args = ["--particles", self._particlesStar(), "--ref", self._getExtraPath(REFERENCE_MRC),
                "--out", self._jobPath(), "--regularizer", REGULARIZERS[self.regularizer.get()],
                "--sym", self.symmetryGroup.get(), "--initial-lowpass-A", self.initialLowpass.get(),
                "--max-iterations", self.maxIterations.get(), "--seed", self.seed.get()]
        if self.maxShift.get() > 0:
            args += ["--max-shift-A", self.maxShift.get()]
        return [str(a) for a in args]

    # -------------------------- STEPS functions -----------------------------
    def convertInputStep(self):
        parts = self.inputParticles.get()
        self._writeParticles(ALIGN_PROJ if parts.hasAlignmentProj() else ALIGN_NONE)
        from pwem.emlib.image import ImageHandler
        reference = self._getExtraPath(REFERENCE_MRC)
        ImageHandler().convert(self.referenceVolume.get(), reference)
        setVoxelSize(reference, self.referenceVolume.get().getSamplingRate())

    def refineStep(self, args):
        """Run the refinement; a job killed earlier with the same arguments continues from
        its last checkpoint (Scipion's Continue), one with other arguments starts over."""
        job, record = self._jobPath(), self._getExtraPath(ARGS_JSON)
        if os.path.exists(os.path.join(job, jobdir.CHECKPOINT)) and os.path.exists(record):
            with open(record) as handle:
                same = json.load(handle) == args
            if same:
                self._runCryocv("refine", ["--continue", job])
                return
            shutil.rmtree(job)
        with open(record, "w") as handle:
            json.dump(args, handle)
        self._runCryocv("refine", args)

    def createOutputStep(self):
        parts = self.inputParticles.get()
        volume = self._createOutputVolume(parts.getSamplingRate())
        outParts = self._createSetOfParticles()
        outParts.copyInfo(parts)
        outParts.setAlignmentProj()
        copyAlignment(parts, outParts, self._jobPath(jobdir.PARTICLES_STAR))
        fsc = self._createOutputFsc()
        self._defineOutputs(outputVolume=volume, outputParticles=outParts, outputFSC=fsc)
        self._defineSourceRelation(self.inputParticles, volume)
        self._defineSourceRelation(self.referenceVolume, volume)
        self._defineTransformRelation(self.inputParticles, outParts)
        self._defineSourceRelation(volume, fsc)

    # -------------------------- INFO functions ------------------------------
    def _validate(self):
        errors = self._validateCommon()
        parts, ref = self.inputParticles.get(), self.referenceVolume.get()
        if parts is not None and not parts.hasCTF():
            errors.append("The input particles have no CTF: refinement needs it (estimate the CTF and "
                          "extract particles with it, or import a STAR file with rlnDefocusU/V).")
        if parts is not None and ref is not None:
            if ref.getXDim() != parts.getXDim():
                errors.append(f"The reference is {ref.getXDim()} px, the particles {parts.getXDim()} px: "
                              f"resize the reference to the particles' box first.")
            if abs(ref.getSamplingRate() - parts.getSamplingRate()) > 1e-3 * parts.getSamplingRate():
                errors.append(f"The reference has {ref.getSamplingRate():.4f} Å/px, the particles "
                              f"{parts.getSamplingRate():.4f} Å/px: resample the reference first.")
        if self.initialLowpass.get() is None or self.initialLowpass.get() <= 0:
            errors.append("Initial low-pass must be a positive resolution in Å.")
        if self.maxIterations.get() is None or self.maxIterations.get() < 1:
            errors.append("Maximum iterations must be at least 1.")
        return errors

    def _summary(self):
        sentence = self._resolutionSentence()
        if sentence is None:
            return ["Output not ready yet."]
        report = self._fscReport()
        return [f"{REGULARIZERS[self.regularizer.get()].upper()} refinement: {sentence}, "
                f"after {len(report.get('iterations') or [])} iterations.", self._deviceSentence()]

    def _methods(self):
        sentence = self._resolutionSentence()
        if sentence is None:
            return []
        reg = ("non-uniform regularization [Punjani2020]" if self.regularizer.get() == 0
               else "an FSC-derived Wiener filter")
        return [f"Particles were refined with cryocv by gold-standard refinement [Scheres2012] with a global "
                f"branch-and-bound pose search [Punjani2017] and {reg}, starting from a reference low-passed to "
                f"{self.initialLowpass.get():g} Å; this gave {sentence}."]

    def _citations(self):
        return ["Punjani2017", "Scheres2012"] + (["Punjani2020"] if self.regularizer.get() == 0 else [])

