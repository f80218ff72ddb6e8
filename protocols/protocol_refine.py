"""ProtCryocvRefine: gold-standard 3D refinement (global branch-and-bound pose search,
NU or uniform regularization) with the ``cryocv refine`` CLI."""
import pyworkflow.protocol.params as params
from pwem.constants import ALIGN_NONE, ALIGN_PROJ
from pwem.objects import FSC, SetOfParticles, Volume
from pwem.protocols import ProtRefine3D

from cryocv.jobs import jobdir
from cryocv.jobs.refine import RefineParams
from cryocv.symmetry import parse_symmetry

from .protocol_base import REGULARIZERS, CryocvProtocolBase

REFERENCE_MRC = "reference.mrc"        # the input reference, in extra/
RELAX_MODE = "maximize"                # the core's --relax mode the form's "Relax symmetry" runs
# CLI flags in the core's parameter errors -> the form's labels
FORM_LABELS = {"--relax-max-align-res-A": "Max. resolution for the mate choice",
               "--extra-final-passes": "Extra final passes", "--break-symmetry": "Break symmetry first",
               "--relax": "Relax symmetry", "--max-shift-A": "Maximum shift",
               "--initial-lowpass-A": "Initial low-pass", "--max-iterations": "Maximum iterations"}


class ProtCryocvRefine(CryocvProtocolBase, ProtRefine3D):
    """Gold-standard 3D refinement of particles against a low-resolution reference.

    Each half-set is refined independently: global pose search by coarse-to-fine
    branch-and-bound (Punjani et al. 2017) and, by default, non-uniform
    regularization, a per-voxel low-pass chosen by cross-validation between
    quarter-maps (Punjani, Zhang & Fleet 2020). Half-sets come from the input's
    _rlnRandomSubset when every particle has one, else from a seeded random split.
    With symmetry relaxation (pseudo-symmetric particles) the maps are reconstructed in C1
    while each particle chooses among the symmetry mates of its pose; the relaxed map minus
    its symmetrized version is a further output.
    """
    _label = "3D refinement (NU)"
    _possibleOutputs = {"outputVolume": Volume, "outputParticles": SetOfParticles, "outputFSC": FSC,
                        "outputDifferenceMap": Volume}

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
        self._defineRelaxationParams(form)
        self._defineComputeParams(form)

    @staticmethod
    def _defineRelaxationParams(form):
        """Symmetry relaxation (``--relax maximize`` and its options), defaults from RefineParams."""
        defaults = RefineParams
        form.addSection(label="Symmetry relaxation")
        form.addParam("relax", params.BooleanParam, default=defaults.relax == RELAX_MODE, label="Relax symmetry",
                      help="For pseudo-symmetric particles (a symmetric core with an asymmetric part: a bound "
                           "partner, a ligand in one of the subunits, a broken ring): the map is reconstructed in "
                           "C1 while each particle chooses among the mates of its pose under the Symmetry of the "
                           "Input tab (the poses a symmetric map cannot tell apart), the best against the C1 "
                           "references (maximization). The Symmetry must then be the pseudo-symmetry (e.g. C4), "
                           "not C1. Typical input: the particles and map of a symmetric (C4) refinement. An extra "
                           "output is the difference map: the relaxed map minus its symmetrized version.")
        form.addParam("breakSymmetry", params.BooleanParam, default=defaults.break_symmetry,
                      condition="relax or breakSymmetry", label="Break symmetry first",
                      help="Start from C1 half-maps of the input poses, each particle turned by a random mate, "
                           "instead of the (symmetric) reference: the asymmetric part then has a start to grow "
                           "from. Needs input particles with an alignment (projection poses), e.g. those of a "
                           "symmetric refinement.")
        form.addParam("relaxMaxAlignRes", params.FloatParam, default=defaults.relax_max_align_res_A,
                      allowsNull=True, condition="relax", label="Max. resolution for the mate choice (Å)",
                      help="The choice among the mates never aligns finer than this resolution (e.g. about the "
                           "size of the asymmetric feature's signal); empty: as the alignment.")
        form.addParam("extraFinalPasses", params.IntParam, default=defaults.extra_final_passes, condition="relax",
                      label="Extra final passes",
                      help="Passes aligned to Nyquist after the final one, letting the mate choices settle at "
                           "full resolution.")

    # -------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep)
        self._insertFunctionStep(self.refineStep, self._refineArgs())
        self._insertFunctionStep(self.createOutputStep)

    def _refineParams(self):
        """The form as the job's :class:`RefineParams` (its checks, the job's defaults elsewhere).
        The relaxation options hidden while Relax symmetry is off are not used then; Break
        symmetry first is kept (it stays visible while set, and _validate reports it)."""
        relax = bool(self.relax.get())
        maxShift = self.maxShift.get()
        return RefineParams(
            regularizer=REGULARIZERS[self.regularizer.get()], symmetry=self.symmetryGroup.get(),
            initial_lowpass_A=self.initialLowpass.get(), max_iterations=self.maxIterations.get(),
            max_shift_A=maxShift if maxShift is not None and maxShift > 0 else None, seed=self.seed.get(),
            relax=RELAX_MODE if relax else None, break_symmetry=bool(self.breakSymmetry.get()),
            relax_max_align_res_A=self.relaxMaxAlignRes.get() if relax else RefineParams.relax_max_align_res_A,
            extra_final_passes=self.extraFinalPasses.get() if relax else RefineParams.extra_final_passes)

    def _refineArgs(self):
        """``cryocv refine`` arguments of the form's values (step argument: an edited form reruns the step);
        the relaxation options only when set (an unchanged form gives the arguments it gave before them)."""
        p = self._refineParams()
        args = ["--particles", self._particlesStar(), "--ref", self._getExtraPath(REFERENCE_MRC),
                "--out", self._jobPath()] + self._regularizationArgs() + ["--seed", p.seed]
        if p.max_shift_A is not None:
            args += ["--max-shift-A", p.max_shift_A]
        if p.relax is not None:
            args += ["--relax", p.relax]
        if p.break_symmetry:
            args.append("--break-symmetry")
        if p.relax_max_align_res_A is not None:
            args += ["--relax-max-align-res-A", p.relax_max_align_res_A]
        if p.extra_final_passes != RefineParams.extra_final_passes:
            args += ["--extra-final-passes", p.extra_final_passes]
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
        if self.relax.get():
            difference = Volume(objLabel=f"{self.getRunName()} (relaxed map minus its symmetrized version)")
            difference.setFileName(self._jobPath(jobdir.DIFFERENCE_MAP))
            difference.setSamplingRate(volume.getSamplingRate())
            self._defineOutputs(outputDifferenceMap=difference)
            self._defineSourceRelation(volume, difference)

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

    def _relaxationErrors(self):
        errors, parts = [], self.inputParticles.get()
        if self.breakSymmetry.get() and not self.relax.get():
            errors.append("Break symmetry first is set but Relax symmetry is not: it only applies when relaxing "
                          "(set Relax symmetry, or clear Break symmetry first).")
        elif self.breakSymmetry.get() and parts is not None and not parts.hasAlignmentProj():
            errors.append("Break symmetry first needs input particles with an alignment (projection poses), e.g. "
                          "those of a symmetric refinement: these have none (clear it, or refine them first).")
        if self.relax.get():
            try:
                trivial = parse_symmetry(self.symmetryGroup.get() or "") == "C1"
            except ValueError:
                trivial = False                     # _validateCommon reports the symmetry
            if trivial:
                errors.append("Relax symmetry relaxes the Symmetry of the Input tab: set it to the "
                              "pseudo-symmetry (e.g. C4), not C1.")
        return errors

    def _summary(self):
        sentence = self._resolutionSentence()
        if sentence is None:
            return ["Output not ready yet."]
        report = self._fscReport()
        lines = [f"{REGULARIZERS[self.regularizer.get()].upper()} refinement: {sentence}, "
                 f"after {len(report.get('iterations') or [])} iterations."]
        relax = report.get("relax")
        if relax:
            line = f"Symmetry relaxed ({relax['mode']}) over the {relax['group']} mates, maps in C1"
            if relax.get("mode_occupancy") is not None:
                occupancy = " / ".join(f"{100 * f:.0f}" for f in relax["mode_occupancy"])
                line += (f"; median change from the input poses {relax['change_from_input_median_deg']:.1f}°, "
                         f"particles per mate of the input pose {occupancy} %")
            lines.append(line + "; the relaxed map minus its symmetrized version is outputDifferenceMap.")
        return lines + [self._deviceSentence()]

    def _methods(self):
        sentence = self._resolutionSentence()
        if sentence is None:
            return []
        reg = ("non-uniform regularization [Punjani2020]" if self.regularizer.get() == 0
               else "an FSC-derived Wiener filter")
        relax = (self._fscReport() or {}).get("relax")
        relaxed = (f" The {relax['group']} symmetry was relaxed: the maps were reconstructed in C1 while each "
                   f"particle took the best of the {relax['group']} mates of its pose against them."
                   if relax else "")
        return [f"Particles were refined with cryocv by gold-standard refinement [Scheres2012] with a global "
                f"branch-and-bound pose search [Punjani2017] and {reg}, starting from a reference low-passed to "
                f"{self.initialLowpass.get():g} Å; this gave {sentence}.{relaxed}"]

    def _citations(self):
        return ["Punjani2017", "Scheres2012"] + (["Punjani2020"] if self.regularizer.get() == 0 else [])

