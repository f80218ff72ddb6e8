"""ProtCryocvLocalRefine: local refinement of a masked region from the poses of a consensus
refinement (optionally after subtracting the signal outside the mask) with the
``cryocv local-refine`` CLI."""
import pyworkflow.protocol.params as params
from pwem.constants import ALIGN_PROJ
from pwem.objects import FSC, SetOfParticles, Volume, VolumeMask
from pwem.protocols import ProtRefine3D

from cryocv.jobs import jobdir
from cryocv.jobs.local_refine import FULCRUM_NAMES, MASK_MODES, LocalRefineParams

from .protocol_base import MARGINALIZE_LABEL, REGULARIZERS, CryocvProtocolBase
from .protocol_relaxation import RELAX_FORM_LABELS, RELAX_OUTPUTS, CryocvRelaxationMixin

FULCRUMS = list(FULCRUM_NAMES)               # the CLI's named fulcrums; the form's third choice is a point
FULCRUM_POINT = len(FULCRUMS)
MASK_MRC = "input_mask.mrc"                  # the input mask, in extra/
# CLI flags in the core's parameter errors -> the form's labels
FORM_LABELS = {"--rotation-extent-deg": "Rotation extent", "--shift-extent-A": "Shift extent",
               "--coarse-step-deg": "Coarse step", "--fine-step-deg": "Fine step",
               "--prior-sigma-deg": "Rotation prior sigma", "--prior-sigma-A": "Shift prior sigma",
               "--fulcrum": "Fulcrum", "--initial-lowpass-A": "Initial low-pass",
               "--max-iterations": "Maximum iterations", "--marginalize-step-deg": MARGINALIZE_LABEL,
               **RELAX_FORM_LABELS}


class ProtCryocvLocalRefine(CryocvRelaxationMixin, CryocvProtocolBase, ProtRefine3D):
    """Local refinement of a masked region (a domain, a bound partner, a subparticle) from the
    poses of a consensus refinement.

    Each particle's pose is searched only inside a window around its input pose (rotation and
    shift extents bound the change over the whole job), rotating about a fulcrum (by default the
    mask's centre of mass), by a coarse grid and branch-and-bound subdivision to the fine step
    (Punjani et al. 2017); each half-set starts from its own consensus half-map, and the FSC is
    measured in the mask. Optionally the signal outside the mask is first subtracted from the
    images (each particle with its own half-map); the output particles are then the subtracted
    images, with the original image in _rlnImageOriginalName. The output maps stay in the input
    frame. With symmetry relaxation (pseudo-symmetric particles; maximization or marginalization)
    the maps are reconstructed in C1 while each particle chooses among the symmetry mates of its
    pose, the extents holding modulo the group; the relaxed map minus its symmetrized version is a
    further output.
    """
    _label = "local refinement"
    _possibleOutputs = {"outputVolume": Volume, "outputMask": VolumeMask, "outputParticles": SetOfParticles,
                        "outputFSC": FSC, **RELAX_OUTPUTS}

    # -------------------------- DEFINE param functions ----------------------
    def _defineParams(self, form):
        defaults = LocalRefineParams
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles", important=True,
                      label="Input particles",
                      help="Particles with CTF, a 3D alignment (projection poses) and half-sets (_rlnRandomSubset): "
                           "the particles of the consensus refinement.")
        form.addParam("inputVolume", params.PointerParam, pointerClass="Volume", important=True,
                      label="Consensus map with half-maps",
                      help="The consensus refinement's map: each half-set starts from its own half-map. "
                           "Same box and pixel size as the particles.")
        form.addParam("refMask", params.PointerParam, pointerClass="VolumeMask", important=True,
                      label="Mask of the region to refine",
                      help="Values in [0, 1], 1 on the region; a soft edge of at least about 5 × the expected "
                           "resolution keeps the FSC honest. Same box and pixel size as the particles.")
        self._defineSymmetryParam(form)

        form.addSection(label="Local search")
        form.addParam("subtractOutside", params.BooleanParam, default=defaults.subtract,
                      label="Subtract the signal outside the mask?",
                      help="First subtract from each image the projection of its own half-map outside the mask "
                           "(as the cryocv particle subtraction); the output particles are the subtracted images.")
        form.addParam("fitScale", params.BooleanParam, default=defaults.fit_scale, condition="subtractOutside",
                      label="Fit a scale per particle?", expertLevel=params.LEVEL_ADVANCED,
                      help="Least-squares amplitude of the subtracted projection per particle; No subtracts with "
                           "scale 1, as RELION does.")
        form.addParam("fulcrum", params.EnumParam, choices=["mask centre of mass", "box centre", "a point"],
                      default=FULCRUMS.index(defaults.fulcrum), display=params.EnumParam.DISPLAY_HLIST,
                      label="Fulcrum",
                      help="Centre of the rotations: the mask's centre of mass, the box centre, or a point.")
        line = form.addLine("Fulcrum point", condition=f"fulcrum == {FULCRUM_POINT}",
                            help="X, Y, Z of the point in Å from the map's corner (as ChimeraX shows a map with "
                                 "origin 0).")
        for axis in "XYZ":
            line.addParam(f"fulcrum{axis}", params.FloatParam, default=0.0, label=f"{axis} (Å)")
        form.addParam("rotationExtent", params.FloatParam, default=defaults.rotation_extent_deg,
                      label="Rotation extent (°)",
                      help="Largest rotation change from the input pose (over the whole job).")
        form.addParam("shiftExtent", params.FloatParam, default=defaults.shift_extent_A, label="Shift extent (Å)",
                      help="Largest change of the fulcrum's image position from the input pose.")
        form.addParam("fineStep", params.FloatParam, default=defaults.fine_step_deg, label="Fine step (°)",
                      help="Angular step at which the branch-and-bound subdivision stops.")
        form.addParam("coarseStep", params.FloatParam, default=defaults.coarse_step_deg, allowsNull=True,
                      label="Coarse step (°)", expertLevel=params.LEVEL_ADVANCED,
                      help="Angular step of the starting grid inside the extent; empty: the extent / 4, "
                           "between 2 × the fine step and 10°.")
        line = form.addLine("Gaussian priors",
                            help="Widths of Gaussian priors on the rotation (°) and shift (Å) change from the input "
                                 "pose; empty: no prior (cryoSPARC's values when on: 15° and 7 Å).")
        line.addParam("priorSigmaRot", params.FloatParam, default=defaults.prior_sigma_deg, allowsNull=True,
                      label="rotation sigma (°)")
        line.addParam("priorSigmaShift", params.FloatParam, default=defaults.prior_sigma_A, allowsNull=True,
                      label="shift sigma (Å)")
        form.addParam("recenter", params.BooleanParam, default=defaults.recenter_each_iteration,
                      label="Re-centre the extents each iteration?",
                      help="Search around the last iteration's poses instead of the input's (recommended with "
                           "priors); the total change may then exceed the extents.")
        form.addParam("narrowSteps", params.IntParam, default=defaults.narrow_steps, expertLevel=params.LEVEL_ADVANCED,
                      label="Narrow the search after the first iteration (steps)",
                      help="After the first iteration, search each particle within this many steps of the second "
                           "search level (2.5° with the default extents) around its last pose, still inside the "
                           "extents: a faster search; 0: the whole extents every iteration.")
        self._defineMarginalizationParam(form, defaults, "1° helped a 25 kDa domain, bench/results/local_vs_relion.md")
        form.addParam("maskMode", params.EnumParam, choices=list(MASK_MODES), default=MASK_MODES.index(defaults.mask_mode),
                      display=params.EnumParam.DISPLAY_HLIST, label="Mask",
                      help="static: the mask as given, for alignment and FSC; dynamic: the thresholded map inside it.")
        form.addSection(label="Refinement")
        self._defineRegularizationParams(form, defaults)
        self._defineRelaxationParams(form, defaults)
        self._defineComputeParams(form)

    # -------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep)
        self._insertFunctionStep(self.localRefineStep, self._localRefineArgs())
        self._insertFunctionStep(self.createOutputStep)

    def _fulcrumSpec(self):
        if self.fulcrum.get() == FULCRUM_POINT:
            return ",".join(f"{getattr(self, f'fulcrum{axis}').get():g}" for axis in "XYZ")
        return FULCRUMS[self.fulcrum.get()]

    def _localParams(self):
        """The form as the job's :class:`LocalRefineParams` (its checks, the job's defaults elsewhere)."""
        return LocalRefineParams(
            regularizer=REGULARIZERS[self.regularizer.get()], symmetry=self.symmetryGroup.get(),
            initial_lowpass_A=self.initialLowpass.get(), max_iterations=self.maxIterations.get(),
            fine_step_deg=self.fineStep.get(), rotation_extent_deg=self.rotationExtent.get(),
            shift_extent_A=self.shiftExtent.get(), coarse_step_deg=self.coarseStep.get(),
            prior_sigma_deg=self.priorSigmaRot.get(), prior_sigma_A=self.priorSigmaShift.get(),
            fulcrum=self._fulcrumSpec(), recenter_each_iteration=bool(self.recenter.get()),
            narrow_steps=self.narrowSteps.get(), marginalize_step_deg=self.marginalizeStep.get(),
            mask_mode=MASK_MODES[self.maskMode.get()], subtract=bool(self.subtractOutside.get()),
            fit_scale=bool(self.fitScale.get()), **self._relaxationFields(LocalRefineParams))

    def _localRefineArgs(self):
        """``cryocv local-refine`` arguments of the form's values (step argument: an edited form reruns the step)."""
        p = self._localParams()
        args = (["--particles", self._particlesStar(), "--half-maps", *self._inputHalfMaps(),
                 "--mask", self._getExtraPath(MASK_MRC), "--out", self._jobPath()] + self._regularizationArgs()
                + ["--fulcrum", p.fulcrum, "--rotation-extent-deg", p.rotation_extent_deg,
                   "--shift-extent-A", p.shift_extent_A, "--fine-step-deg", p.fine_step_deg, "--mask-mode", p.mask_mode])
        optional = [("--coarse-step-deg", p.coarse_step_deg), ("--prior-sigma-deg", p.prior_sigma_deg),
                    ("--prior-sigma-A", p.prior_sigma_A), ("--narrow-steps", p.narrow_steps),
                    ("--marginalize-step-deg", p.marginalize_step_deg)]
        args += [item for flag, value in optional if value is not None for item in (flag, value)]
        args += [flag for flag, on in (("--subtract", p.subtract), ("--no-scale", p.subtract and not p.fit_scale),
                                       ("--recenter-each-iteration", p.recenter_each_iteration)) if on]
        args += self._relaxationArgs(p)
        return [str(a) for a in args]

    # -------------------------- STEPS functions -----------------------------
    def convertInputStep(self):
        self._writeParticles(ALIGN_PROJ)
        self._convertHalfMaps(self.inputVolume.get())
        mask = self.refMask.get()
        self._convertMap(mask, MASK_MRC, mask.getSamplingRate())

    def localRefineStep(self, args):
        """Run the local refinement (continues a killed one with the same arguments)."""
        self._runResumable("local-refine", args)

    def createOutputStep(self):
        samplingRate = self.inputParticles.get().getSamplingRate()
        volume = self._createOutputVolume(samplingRate)
        mask = VolumeMask()
        mask.setFileName(self._jobPath(jobdir.MASK))
        mask.setSamplingRate(samplingRate)
        outParts = self._createOutputParticles(newImages=bool(self.subtractOutside.get()))
        fsc = self._createOutputFsc()
        self._defineOutputs(outputVolume=volume, outputMask=mask, outputParticles=outParts, outputFSC=fsc)
        for source in (self.inputParticles, self.inputVolume, self.refMask):
            self._defineSourceRelation(source, volume)
        self._defineSourceRelation(self.refMask, mask)
        self._defineTransformRelation(self.inputParticles, outParts)
        self._defineSourceRelation(self.inputVolume, outParts)
        self._defineSourceRelation(volume, fsc)
        self._defineDifferenceMapOutput(volume)

    # -------------------------- INFO functions ------------------------------
    def _validate(self):
        errors = self._validateCommon()
        parts = self.inputParticles.get()
        if parts is not None and not parts.hasCTF():
            errors.append("The input particles have no CTF: local refinement needs it.")
        errors += self._consensusErrors(self.inputVolume.get(), self.refMask.get(),
                                        "local refinement starts each half-set from its own half-map")
        errors += self._regularizationErrors() + self._relaxationErrors()
        if not errors:
            errors += self._paramsErrors(self._localParams(), FORM_LABELS)
        return errors

    def _localReport(self):
        """fsc.json of the finished job (with its ``local`` dict), or None."""
        report = self._fscReport()
        return report if report is not None and "local" in report and hasattr(self, "outputVolume") else None

    def _summary(self):
        report, sentence = self._localReport(), self._resolutionSentence()
        if report is None or sentence is None:
            return ["Output not ready yet."]
        local, p = report["local"], self._localParams()
        at, fulcrum = local["fraction_at_extent"], ", ".join(f"{c:.1f}" for c in local["fulcrum_A"])
        lines = [f"Local {report['regularizer'].upper()} refinement, in the mask: {sentence}, after "
                 f"{len(report.get('iterations') or [])} iterations.",
                 f"Mask: {local['mask_mass_kDa']:.0f} kDa (protein filling its volume), soft edge "
                 f"{local['mask_soft_edge_A']:.1f} Å; fulcrum ({fulcrum}) Å from the map's corner.",
                 f"Pose change from the input: median {local['rotation_change_median_deg']:.2f}°, "
                 f"{local['shift_change_median_A']:.2f} Å; at the extents ({p.rotation_extent_deg:g}°, "
                 f"{p.shift_extent_A:g} Å): {100 * at['rotation']:.1f}% (rotation), {100 * at['shift']:.1f}% (shift)"
                 + (" -- many at an extent: widen it." if max(at.values()) > 0.05 else ".")]
        if p.subtract:
            lines.append("The signal outside the mask was subtracted first: the output particles are the "
                         "subtracted images (original images in _rlnImageOriginalName).")
        return lines + self._relaxationSummary(report) + [self._deviceSentence()]

    def _methods(self):
        report, sentence = self._localReport(), self._resolutionSentence()
        if report is None or sentence is None:
            return []
        p, fulcrum = self._localParams(), ", ".join(f"{c:.1f}" for c in report["local"]["fulcrum_A"])
        reg = ("non-uniform regularization [Punjani2020]" if p.regularizer == "nu"
               else "an FSC-derived Wiener filter")
        subtracted = ("After the signal outside the mask was subtracted from the images (each particle's own "
                      "half-map, projected at its pose), " if p.subtract else "")
        return [f"{subtracted}{'p' if p.subtract else 'P'}articles were refined locally in a mask with cryocv: "
                f"each pose was searched by branch-and-bound [Punjani2017] to {p.fine_step_deg:g}° within "
                f"{p.rotation_extent_deg:g}° and {p.shift_extent_A:g} Å of its consensus pose, rotating about "
                f"({fulcrum}) Å, each half-set against its own half-map (gold-standard [Scheres2012]), "
                f"with {reg}; this gave {sentence}.{self._relaxationMethods(report)}"]

    def _citations(self):
        return ["Punjani2017", "Scheres2012"] + (["Punjani2020"] if self.regularizer.get() == 0 else [])
