"""ProtCryocvAbinitio: homogeneous ab-initio refinement from no input volume (SGD on two
independent half-sets from random maps, then gold-standard E/M) with the ``cryocv abinitio`` CLI."""
import pyworkflow.protocol.params as params
from pwem.constants import ALIGN_NONE
from pwem.objects import FSC, SetOfParticles, Volume
from pwem.protocols import ProtInitialVolume

from cryocv.jobs import jobdir
from cryocv.jobs.abinitio import AbinitioParams

from .protocol_base import REGULARIZERS, CryocvProtocolBase

# CLI flags in the core's parameter errors -> the form's labels
FORM_LABELS = {"--init-res-A": "Initial resolution", "--sgd-iterations": "SGD iterations",
               "--minibatch START": "Minibatch start", "--minibatch": "Minibatch",
               "END": "end", "--check-every": "Check every", "--n-particles": "Number of particles",
               "--max-iterations": "Maximum E/M iterations"}


class ProtCryocvAbinitio(CryocvProtocolBase, ProtInitialVolume):
    """Ab-initio 3D reconstruction of particles without any starting map.

    Each half-set starts from its own random map and is refined by stochastic gradient descent
    over growing minibatches (Punjani et al. 2017), aligning first at the initial resolution and
    marching finer as its own quarter-set FSC allows; every few iterations half-set 2 is aligned
    to half-set 1 (rotation, shift, hand). E/M passes of the gold-standard refinement from the
    two aligned maps follow (global pose search), then a final pass to Nyquist. Half-sets come
    from the input's _rlnRandomSubset when every particle has one, else from a seeded random split.
    """
    _label = "ab-initio"
    _possibleOutputs = {"outputVolume": Volume, "outputParticles": SetOfParticles, "outputFSC": FSC}

    # -------------------------- DEFINE param functions ----------------------
    def _defineParams(self, form):
        defaults = AbinitioParams
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles", important=True,
                      label="Input particles",
                      help="Particles with CTF; an alignment is not needed (and not used).")
        self._defineSymmetryParam(form)
        form.addParam("nParticles", params.IntParam, default=defaults.n_particles, allowsNull=True,
                      label="Number of particles",
                      help="Use a random subset of this many particles, balanced over the half-sets; empty: all. "
                           "The output particles are the ones used.")
        form.addSection(label="Ab-initio")
        form.addParam("initRes", params.FloatParam, default=defaults.init_res_A, label="Initial resolution (Å)",
                      help="The SGD aligns to this resolution first, then finer as each half-set's own "
                           "quarter-set FSC allows.")
        form.addParam("sgdIterations", params.IntParam, default=defaults.sgd_iterations, label="SGD iterations",
                      help="Minibatches per half-set.")
        line = form.addLine("Minibatch size",
                            help="Images per minibatch, growing from start to end over the first two thirds "
                                 "of the SGD iterations.")
        line.addParam("minibatchStart", params.IntParam, default=defaults.minibatch_start, label="start")
        line.addParam("minibatchEnd", params.IntParam, default=defaults.minibatch_end, label="end")
        form.addParam("checkEvery", params.IntParam, default=defaults.check_every, label="Check every",
                      expertLevel=params.LEVEL_ADVANCED,
                      help="SGD iterations between resolution checks, re-centring and aligning half-set 2 to "
                           "half-set 1.")
        form.addSection(label="Refinement")
        self._defineRegularizerParam(form, defaults)
        form.addParam("maxIterations", params.IntParam, default=defaults.max_iterations,
                      label="Maximum E/M iterations",
                      help="Gold-standard E/M iterations from the two aligned SGD maps (fewer when resolution "
                           "and poses stop improving); a final pass to Nyquist follows either way.")
        form.addParam("seed", params.IntParam, default=defaults.seed, label="Random seed",
                      expertLevel=params.LEVEL_ADVANCED,
                      help="Seed of the random maps, minibatches, particle subset and half-set split (when the "
                           "input has none).")
        self._defineComputeParams(form)

    # -------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep)
        self._insertFunctionStep(self.abinitioStep, self._abinitioArgs())
        self._insertFunctionStep(self.createOutputStep)

    def _abinitioParams(self):
        """The form as the job's :class:`AbinitioParams` (its checks, the job's defaults elsewhere)."""
        return AbinitioParams(
            symmetry=self.symmetryGroup.get(), n_particles=self.nParticles.get(), init_res_A=self.initRes.get(),
            sgd_iterations=self.sgdIterations.get(), minibatch_start=self.minibatchStart.get(),
            minibatch_end=self.minibatchEnd.get(), check_every=self.checkEvery.get(),
            regularizer=REGULARIZERS[self.regularizer.get()], max_iterations=self.maxIterations.get(),
            seed=self.seed.get())

    def _abinitioArgs(self):
        """``cryocv abinitio`` arguments of the form's values (step argument: an edited form reruns the step)."""
        p = self._abinitioParams()
        args = ["--particles", self._particlesStar(), "--out", self._jobPath(), "--sym", p.symmetry,
                "--init-res-A", p.init_res_A, "--sgd-iterations", p.sgd_iterations,
                "--minibatch", p.minibatch_start, p.minibatch_end, "--check-every", p.check_every,
                "--regularizer", p.regularizer, "--max-iterations", p.max_iterations, "--seed", p.seed]
        if p.n_particles is not None:
            args += ["--n-particles", p.n_particles]
        return [str(a) for a in args]

    # -------------------------- STEPS functions -----------------------------
    def convertInputStep(self):
        self._writeParticles(ALIGN_NONE)        # poses are not used: the search is global from random maps

    def abinitioStep(self, args):
        """Run the ab-initio job (continues a killed one with the same arguments, in its SGD or E/M phase)."""
        self._runResumable("abinitio", args, checkpoints=(jobdir.CHECKPOINT, jobdir.SGD_STATE))

    def createOutputStep(self):
        volume = self._createOutputVolume(self.inputParticles.get().getSamplingRate())
        outParts = self._createOutputParticles()
        fsc = self._createOutputFsc()
        self._defineOutputs(outputVolume=volume, outputParticles=outParts, outputFSC=fsc)
        self._defineSourceRelation(self.inputParticles, volume)
        self._defineTransformRelation(self.inputParticles, outParts)
        self._defineSourceRelation(volume, fsc)

    # -------------------------- INFO functions ------------------------------
    def _validate(self):
        errors = self._validateCommon()
        parts = self.inputParticles.get()
        if parts is not None and not parts.hasCTF():
            errors.append("The input particles have no CTF: ab-initio needs it (estimate the CTF and "
                          "extract particles with it, or import a STAR file with rlnDefocusU/V).")
        errors += self._paramsErrors(self._abinitioParams(), FORM_LABELS)
        return errors

    def _abinitioReport(self):
        """fsc.json of the finished job (with its ``sgd`` history), or None."""
        report = self._fscReport()
        return report if report is not None and "sgd" in report and hasattr(self, "outputVolume") else None

    def _summary(self):
        report, sentence = self._abinitioReport(), self._resolutionSentence()
        if report is None or sentence is None:
            return ["Output not ready yet."]
        sgd = report["sgd"][-1] if report["sgd"] else None
        lines = [f"Ab-initio ({report['regularizer'].upper()} E/M): {sentence}, after "
                 f"{len(report.get('iterations') or [])} E/M passes (the final one included)."]
        if sgd is not None:
            lines.append(f"SGD: {sgd['iteration']} iterations per half-set, aligning at the end to "
                         f"{sgd['cutoff_A'][0]:.1f} / {sgd['cutoff_A'][1]:.1f} Å (half-set 1 / 2); the aligned "
                         f"SGD half-maps agreed to {sgd['half_map_resolution_A']:.1f} Å.")
        return lines + [self._deviceSentence()]

    def _methods(self):
        report, sentence = self._abinitioReport(), self._resolutionSentence()
        if report is None or sentence is None:
            return []
        p = self._abinitioParams()
        reg = ("non-uniform regularization [Punjani2020]" if p.regularizer == "nu"
               else "an FSC-derived Wiener filter")
        return [f"An initial map was determined ab initio with cryocv: each half-set was refined independently "
                f"from its own random map by stochastic gradient descent [Punjani2017] ({p.sgd_iterations} "
                f"minibatches of {p.minibatch_start}-{p.minibatch_end} images, from {p.init_res_A:g} Å), the "
                f"two maps were brought into register and refined further by gold-standard refinement "
                f"[Scheres2012] with a global branch-and-bound pose search and {reg}; this gave {sentence}."]

    def _citations(self):
        return ["Punjani2017", "Scheres2012"] + (["Punjani2020"] if self.regularizer.get() == 0 else [])
