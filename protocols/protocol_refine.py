"""ProtCryocvRefine: gold-standard 3D refinement (global branch-and-bound pose search,
NU or uniform regularization) with the ``cryocv refine`` CLI."""
import pyworkflow.protocol.params as params
from pwem.constants import ALIGN_NONE, ALIGN_PROJ
from pwem.objects import FSC, SetOfParticles, Volume
from pwem.protocols import ProtRefine3D

from cryocv.jobs.refine import RefineParams
from cryocv.jobs.registration import MIN_MOVE_DEG, MIN_MOVE_PX

from .protocol_base import MARGINALIZE_LABEL, REGULARIZERS, CryocvProtocolBase
from .protocol_relaxation import RELAX_FORM_LABELS, RELAX_OUTPUTS, CryocvRelaxationMixin

REFERENCE_MRC = "reference.mrc"        # the input reference, in extra/
# CLI flags in the core's parameter errors -> the form's labels
FORM_LABELS = {**RELAX_FORM_LABELS, "--max-shift-A": "Maximum shift", "--initial-lowpass-A": "Initial low-pass",
               "--max-iterations": "Maximum iterations", "--marginalize-step-deg": MARGINALIZE_LABEL,
               "--staged-start-res-A": "Staged start"}


class ProtCryocvRefine(CryocvRelaxationMixin, CryocvProtocolBase, ProtRefine3D):
    """Gold-standard 3D refinement of particles against a low-resolution reference.

    Each half-set is refined independently: global pose search by coarse-to-fine
    branch-and-bound (Punjani et al. 2017) and, by default, non-uniform
    regularization, a per-voxel low-pass chosen by cross-validation between
    quarter-maps (Punjani, Zhang & Fleet 2020). Half-sets come from the input's
    _rlnRandomSubset when every particle has one, else from a seeded random split.
    With symmetry relaxation (pseudo-symmetric particles; maximization or marginalization) the
    maps are reconstructed in C1 while each particle chooses among the symmetry mates of its
    pose; the relaxed map minus its symmetrized version is a further output.
    """
    _label = "3D refinement (NU)"
    _possibleOutputs = {"outputVolume": Volume, "outputParticles": SetOfParticles, "outputFSC": FSC,
                        **RELAX_OUTPUTS}

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
        self._defineRegularizationParams(form, RefineParams)
        form.addParam("maxShift", params.FloatParam, default=-1, label="Maximum shift (Å)",
                      expertLevel=params.LEVEL_ADVANCED, help="Search range of origins; -1: 10% of the box.")
        form.addParam("seed", params.IntParam, default=RefineParams.seed, label="Random seed", expertLevel=params.LEVEL_ADVANCED,
                      help="Seed of the half-set split (when the input has none).")
        self._defineMarginalizationParam(form, RefineParams, "1.5° gave finer maps of a 30 kDa membrane protein and of "
                                                             "TRPV1 at 2,000 particles, bench/results/small_membrane.md")
        form.addParam("stagedStart", params.FloatParam, default=RefineParams.staged_start_res_A, allowsNull=True,
                      expertLevel=params.LEVEL_ADVANCED, label="Staged start (Å)",
                      help="Align no finer than this resolution until the refinement converges (or reaches the "
                           "maximum iterations), then restart each half-set from its own regularized half-map "
                           "low-passed to it and refine on without the cap (up to twice the iterations). For "
                           "featureless starts: 8 Å lowered the pose error of a 30 kDa membrane protein from a 30 Å "
                           "start by up to 28 %, but raised it from a good 8 Å start "
                           "(bench/results/small_membrane.md); empty: one stage.")
        form.addParam("registerHalves", params.BooleanParam, default=RefineParams.register_halves,
                      expertLevel=params.LEVEL_ADVANCED, label="Keep half-sets in register",
                      help="After each iteration, align half-set 2's map to half-set 1's within a few degrees and "
                           f"move it and its particles' poses onto it when they are more than {MIN_MOVE_DEG:g}° or "
                           f"{MIN_MOVE_PX:g} px apart. "
                           "Without it, half-set 2 of a small particle in a round micelle ended 2.5-6.6° off the truth "
                           "while half-set 1 stayed within 1.6°, "
                           "which blurred the combined map (bench/results/small_membrane.md). Only the six numbers "
                           "of the move pass between the half-sets. With Cn symmetry only the turn about the axis and "
                           "the shift along it are applied; D, T, O and I maps are not registered (their frames are "
                           "fixed). Not used with symmetry relaxation, which registers the half-sets over the group.")
        self._defineRelaxationParams(form, RefineParams)
        self._defineComputeParams(form)

    # -------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep)
        self._insertFunctionStep(self.refineStep, self._refineArgs())
        self._insertFunctionStep(self.createOutputStep)

    def _refineParams(self):
        """The form as the job's :class:`RefineParams` (its checks, the job's defaults elsewhere)."""
        maxShift = self.maxShift.get()
        return RefineParams(
            regularizer=REGULARIZERS[self.regularizer.get()], symmetry=self.symmetryGroup.get(),
            initial_lowpass_A=self.initialLowpass.get(), max_iterations=self.maxIterations.get(),
            max_shift_A=maxShift if maxShift is not None and maxShift > 0 else None, seed=self.seed.get(),
            marginalize_step_deg=self.marginalizeStep.get(), staged_start_res_A=self.stagedStart.get(),
            register_halves=self.registerHalves.get(), **self._relaxationFields(RefineParams))

    def _refineArgs(self):
        """``cryocv refine`` arguments of the form's values (step argument: an edited form reruns the step);
        the relaxation options only when set (an unchanged form gives the arguments it gave before them)."""
        p = self._refineParams()
        args = ["--particles", self._particlesStar(), "--ref", self._getExtraPath(REFERENCE_MRC),
                "--out", self._jobPath()] + self._regularizationArgs() + ["--seed", p.seed]
        if p.max_shift_A is not None:
            args += ["--max-shift-A", p.max_shift_A]
        if p.marginalize_step_deg is not None:
            args += ["--marginalize-step-deg", p.marginalize_step_deg]
        if p.staged_start_res_A is not None:
            args += ["--staged-start-res-A", p.staged_start_res_A]
        if not p.register_halves:
            args += ["--no-register-halves"]
        args += self._relaxationArgs(p)
        return [str(a) for a in args]

    # -------------------------- STEPS functions -----------------------------
    def convertInputStep(self):
        parts = self.inputParticles.get()
        self._writeParticles(ALIGN_PROJ if parts.hasAlignmentProj() else ALIGN_NONE)
        reference = self.referenceVolume.get()
        self._convertMap(reference, REFERENCE_MRC, reference.getSamplingRate())

    def refineStep(self, args):
        """Run the refinement (continues a killed one with the same arguments)."""
        self._runResumable("refine", args)

    def createOutputStep(self):
        volume = self._createOutputVolume(self.inputParticles.get().getSamplingRate())
        outParts = self._createOutputParticles()
        fsc = self._createOutputFsc()
        self._defineOutputs(outputVolume=volume, outputParticles=outParts, outputFSC=fsc)
        self._defineSourceRelation(self.inputParticles, volume)
        self._defineSourceRelation(self.referenceVolume, volume)
        self._defineTransformRelation(self.inputParticles, outParts)
        self._defineSourceRelation(volume, fsc)
        self._defineDifferenceMapOutput(volume)

    # -------------------------- INFO functions ------------------------------
    def _validate(self):
        errors = self._validateCommon()
        parts, ref = self.inputParticles.get(), self.referenceVolume.get()
        if parts is not None and not parts.hasCTF():
            errors.append("The input particles have no CTF: refinement needs it (estimate the CTF and "
                          "extract particles with it, or import a STAR file with rlnDefocusU/V).")
        errors += self._gridErrors("reference", ref, "resample or resize the reference to the particles' grid first.")
        errors += self._regularizationErrors() + self._relaxationErrors()
        if not errors:
            errors += self._paramsErrors(self._refineParams(), FORM_LABELS)
        return errors

    def _summary(self):
        sentence = self._resolutionSentence()
        if sentence is None:
            return ["Output not ready yet."]
        report = self._fscReport()
        lines = [f"{REGULARIZERS[self.regularizer.get()].upper()} refinement: {sentence}, "
                 f"after {len(report.get('iterations') or [])} iterations."]
        return lines + self._relaxationSummary(report) + [self._deviceSentence()]

    def _methods(self):
        sentence = self._resolutionSentence()
        if sentence is None:
            return []
        reg = ("non-uniform regularization [Punjani2020]" if self.regularizer.get() == 0
               else "an FSC-derived Wiener filter")
        relaxed = self._relaxationMethods(self._fscReport())
        return [f"Particles were refined with cryocv by gold-standard refinement [Scheres2012] with a global "
                f"branch-and-bound pose search [Punjani2017] and {reg}, starting from a reference low-passed to "
                f"{self.initialLowpass.get():g} Å; this gave {sentence}.{relaxed}"]

    def _citations(self):
        return ["Punjani2017", "Scheres2012"] + (["Punjani2020"] if self.regularizer.get() == 0 else [])

