"""What the cryocv protocols share: input conversion (particles to RELION 3.1 STAR
through ``relion.convert``, maps to MRC), the form of a refinement, running the ``cryocv``
CLI with ``runJob`` (a refinement continues from its checkpoint), checks of a consensus
(poses, half-sets, half-maps, mask), and reading a job folder (particles, map, half-maps,
``fsc.json``) back as Scipion objects."""
import json
import os
import shutil

import pyworkflow.protocol.params as params
from pwem.constants import ALIGN_PROJ
from pwem.objects import FSC, Volume
from pyworkflow.protocol.constants import GPU_LIST, USE_GPU

from cryocv.errors import CryocvError
from cryocv.jobs import jobdir
from cryocv.symmetry import DEFAULT_SYMMETRY, parse_symmetry

JOB_FOLDER = "job"
PARTICLES_STAR = "input_particles.star"
INPUT_HALF_MAPS = ("input_half_map_1.mrc", "input_half_map_2.mrc")   # the input half-maps, in extra/
ARGS_JSON = "refine_args.json"         # the arguments a refinement was started with, in extra/
REGULARIZERS = ["nu", "uniform"]
MARGINALIZE_LABEL = "Marginalize over poses: step (°)"      # the form's label of --marginalize-step-deg


class CryocvProtocolBase:
    """Mixin for the cryocv protocols (put before the pwem protocol class)."""

    _label = None

    # -------------------------- form pieces ---------------------------------
    @staticmethod
    def _defineSymmetryParam(form):
        form.addParam("symmetryGroup", params.StringParam, default=DEFAULT_SYMMETRY, label="Symmetry",
                      help="Point group imposed, RELION's conventions: C1, Cn, Dn, T, O, I (I1-I4), "
                           "e.g. C4 for a tetrameric channel.")

    @staticmethod
    def _defineRegularizerParam(form, paramsClass):
        """The regularizer choice, default from ``paramsClass`` (the job's Params dataclass)."""
        form.addParam("regularizer", params.EnumParam, choices=["non-uniform (NU)", "uniform"],
                      default=REGULARIZERS.index(paramsClass.regularizer),
                      display=params.EnumParam.DISPLAY_HLIST, label="Regularizer",
                      help="NU: per-voxel low-pass chosen by cross-validation (best for membrane proteins in "
                           "micelles or flexible parts). Uniform: one FSC-derived Wiener filter.")

    @staticmethod
    def _defineRegularizationParams(form, paramsClass):
        """Regularizer, initial low-pass and iterations of a refinement, defaults from ``paramsClass``
        (the job's Params dataclass)."""
        CryocvProtocolBase._defineRegularizerParam(form, paramsClass)
        form.addParam("initialLowpass", params.FloatParam, default=paramsClass.initial_lowpass_A,
                      label="Initial low-pass (Å)",
                      help="The reference is low-passed to this resolution before the first iteration.")
        form.addParam("maxIterations", params.IntParam, default=paramsClass.max_iterations,
                      label="Maximum iterations",
                      help="Refinement stops earlier when resolution and pose changes stop improving; a final "
                           "pass to Nyquist follows either way.")

    @staticmethod
    def _defineMarginalizationParam(form, paramsClass, evidence: str):
        """``marginalizeStep`` (``--marginalize-step-deg``), default from ``paramsClass``; ``evidence``: what
        it did in the benchmarks, for the help."""
        form.addParam("marginalizeStep", params.FloatParam, default=paramsClass.marginalize_step_deg, allowsNull=True,
                      expertLevel=params.LEVEL_ADVANCED, label=MARGINALIZE_LABEL,
                      help="Insert each particle at the 27 rotations (± this step) × 9 shifts around its best pose, "
                           "weighted by their likelihood: RELION's marginalization over poses, restricted to this "
                           f"neighbourhood ({evidence}; 16 insertions per particle); "
                           "empty: the best pose only. Not with symmetry relaxation.")

    @staticmethod
    def _defineComputeParams(form):
        form.addHidden(USE_GPU, params.BooleanParam, default=True,
                       label="Use GPU",
                       help="Run on the GPU (CuPy) when the core finds one; otherwise, and with No, on the CPU.")
        form.addHidden(GPU_LIST, params.StringParam, default="0", label="GPU IDs",
                       help="GPU to run on (the first of the list; multi-GPU runs are not implemented yet). "
                            "The job sees only these GPUs (CUDA_VISIBLE_DEVICES).")

    # -------------------------- paths ---------------------------------------
    def _jobPath(self, *names):
        return self._getExtraPath(JOB_FOLDER, *names)

    def _particlesStar(self):
        return self._getExtraPath(PARTICLES_STAR)

    def _inputHalfMaps(self):
        """Where :meth:`_convertHalfMaps` writes the input half-maps."""
        return [self._getExtraPath(name) for name in INPUT_HALF_MAPS]

    def _regularizationArgs(self):
        """CLI arguments of the regularization form and the symmetry."""
        return ["--regularizer", REGULARIZERS[self.regularizer.get()], "--sym", self.symmetryGroup.get(),
                "--initial-lowpass-A", self.initialLowpass.get(), "--max-iterations", self.maxIterations.get()]

    # -------------------------- steps ---------------------------------------
    def _writeParticles(self, alignType):
        """The input particles as RELION 3.1 STAR; MRC stacks are linked into extra/,
        other formats (SPIDER, Xmipp .stk, ...) converted to MRC stacks there."""
        import relion.convert
        parts = self.inputParticles.get()
        mrc = all(f.split(":")[0].endswith((".mrc", ".mrcs")) for f in parts.getFiles())
        relion.convert.writeSetOfParticles(parts, self._particlesStar(), outputDir=self._getExtraPath(),
                                           alignType=alignType, forceConvert=not mrc)

    def _convertMap(self, image, name, samplingRate):
        """A Volume/VolumeMask or a map file (``image``) as an MRC in extra/ with ``samplingRate``
        (Å/px) in its header; returns the path."""
        from pwem.emlib.image import ImageHandler
        path = self._getExtraPath(name)
        ImageHandler().convert(image, path)
        setVoxelSize(path, samplingRate)
        return path

    def _convertHalfMaps(self, volume):
        """The half-maps of ``volume`` as MRCs in extra/ (INPUT_HALF_MAPS); returns their paths."""
        return [self._convertMap(source, name, volume.getSamplingRate())
                for source, name in zip(volume.getHalfMaps().split(","), INPUT_HALF_MAPS)]

    def _runResumable(self, command, args, checkpoints=(jobdir.CHECKPOINT,)):
        """Run a refinement job; one killed earlier with the same arguments continues from its last
        checkpoint (Scipion's Continue), one with other arguments starts over. ``checkpoints``: the
        job-folder files any of which marks a job that ``--continue`` can go on with."""
        job, record = self._jobPath(), self._getExtraPath(ARGS_JSON)
        if any(os.path.exists(os.path.join(job, name)) for name in checkpoints) and os.path.exists(record):
            with open(record) as handle:
                same = json.load(handle) == args
            if same:
                self._runCryocv(command, ["--continue", job])
                return
            shutil.rmtree(job)
        with open(record, "w") as handle:
            json.dump(args, handle)
        self._runCryocv(command, args)

    def _runCryocv(self, command, args):
        """``cryocv COMMAND ARGS --device …`` through runJob, in the core's environment.

        With *Use GPU* the job sees only the protocol's GPUs (CUDA_VISIBLE_DEVICES);
        under a queue the scheduler sets CUDA_VISIBLE_DEVICES itself and it is left alone.
        The core runs on the GPU when CuPy finds one there, else on the CPU (the summary
        says which). bash runs the command, so CRYOCV_ACTIVATION may use bash syntax.
        """
        from cryocv import Plugin
        useGpu = bool(self.useGpu)
        args = [command] + [str(a) for a in args] + ["--device", "auto" if useGpu else "cpu", "--quiet"]
        program = Plugin.getProgram(gpu=useGpu and not self.useQueue())
        self.runJob(program, args, env=Plugin.getEnviron(), numberOfMpi=1, executable="/bin/bash")

    @staticmethod
    def _paramsErrors(jobParams, formLabels: dict) -> list:
        """The job's own check of its Params (``jobParams.validate()``), its message in the
        form's words (``formLabels`` {CLI flag: form label}): [] or one error."""
        try:
            jobParams.validate()
        except CryocvError as exc:
            message = str(exc)
            for flag, label in formLabels.items():
                message = message.replace(flag, label)
            return [message[0].upper() + message[1:] + "."]
        return []

    # -------------------------- outputs -------------------------------------
    def _fscReport(self):
        """The job's ``fsc.json`` as a dict, or None before the job has written it."""
        path = self._jobPath(jobdir.FSC_JSON)
        if not os.path.exists(path):
            return None
        with open(path) as handle:
            return json.load(handle)

    def _createOutputParticles(self, newImages=False):
        """The input particles with the poses (and, with ``newImages``, the images) of the job's
        particles.star (see :func:`copyAlignment`)."""
        parts = self.inputParticles.get()
        outParts = self._createSetOfParticles()
        outParts.copyInfo(parts)
        outParts.setAlignmentProj()
        copyAlignment(parts, outParts, self._jobPath(jobdir.PARTICLES_STAR), newImages=newImages)
        return outParts

    def _createOutputVolume(self, samplingRate):
        volume = Volume()
        volume.setFileName(self._jobPath(jobdir.MAP))
        volume.setSamplingRate(samplingRate)
        volume.setHalfMaps([self._jobPath(name) for name in jobdir.HALF_MAPS])
        return volume

    def _createOutputFsc(self):
        """Half-map FSC of the job: the masked, phase-randomization-corrected curve
        (the one ``resolution_A`` is read from) or the unmasked one without a mask."""
        report = self._fscReport()
        curve = "fsc_corrected" if "fsc_corrected" in report else "fsc_unmasked"
        fsc = FSC(objLabel=f"{self.getRunName()} ({'masked, corrected' if curve == 'fsc_corrected' else 'unmasked'})")
        fsc.setData([float(f) for f in report["frequency_per_A"]], [float(v) for v in report[curve]])
        return fsc

    # -------------------------- info ----------------------------------------
    def _validateCommon(self):
        errors = []
        if self.useGpu and not self.useQueue() and not self.getGpuList():
            errors.append("Use GPU is set but the GPU IDs are empty: give at least one (e.g. 0).")
        if hasattr(self, "symmetryGroup"):
            try:
                parse_symmetry(self.symmetryGroup.get() or "")
            except ValueError as exc:
                errors.append(f"Symmetry: {exc}")
        parts = self.inputParticles.get()
        if parts is not None and parts.getSize() < 4:
            errors.append(f"Only {parts.getSize()} particles: a gold-standard job needs at least 2 per half-set.")
        return errors

    def _gridErrors(self, what, item, advice=""):
        """Errors when ``item`` (a volume or mask) has another box or pixel size than the particles."""
        parts, errors = self.inputParticles.get(), []
        if parts is None or item is None:
            return errors
        if item.getXDim() != parts.getXDim():
            errors.append(f"The {what} is {item.getXDim()} px, the particles {parts.getXDim()} px"
                          + (f": {advice}" if advice else "."))
        if abs(item.getSamplingRate() - parts.getSamplingRate()) > 1e-3 * parts.getSamplingRate():
            errors.append(f"The {what} has {item.getSamplingRate():.4f} Å/px, the particles "
                          f"{parts.getSamplingRate():.4f} Å/px" + (f": {advice}" if advice else "."))
        return errors

    def _consensusErrors(self, volume, mask, whyHalfSets):
        """Errors of the inputs of a job that starts from a consensus refinement: particles with
        projection poses and half-sets, a map with half-maps, map and mask on the particles' grid."""
        parts, errors = self.inputParticles.get(), []
        if parts is not None and not parts.hasAlignmentProj():
            errors.append("The input particles have no 3D alignment (projection poses): refine them first.")
        if parts is not None and parts.getSize() and not parts.getFirstItem().hasAttribute("_rlnRandomSubset"):
            errors.append(f"The input particles have no half-sets (_rlnRandomSubset): {whyHalfSets}, so it needs "
                          f"the half-sets of the refinement that made them.")
        if volume is not None and not volume.hasHalfMaps():
            errors.append("The map has no half-maps: use the output map of a refinement (it carries them).")
        return errors + self._gridErrors("map", volume) + self._gridErrors("mask", mask)

    def _regularizationErrors(self):
        errors = []
        if self.initialLowpass.get() is None or self.initialLowpass.get() <= 0:
            errors.append("Initial low-pass must be a positive resolution in Å.")
        if self.maxIterations.get() is None or self.maxIterations.get() < 1:
            errors.append("Maximum iterations must be at least 1.")
        return errors

    def _deviceSentence(self):
        """Where the job ran, from its job.json (None before it has run)."""
        path = self._jobPath(jobdir.JOB_JSON)
        if not os.path.exists(path):
            return None
        with open(path) as handle:
            device = json.load(handle).get("device", "")
        if self.useGpu and device == "cpu":
            return ("Ran on the CPU although Use GPU was set: CuPy found no GPU in the core's environment "
                    "(pip install 'cryocv[gpu]' there, or set CRYOCV_PYTHON).")
        return f"Ran on the {device.upper()}." if device else None

    def _resolutionSentence(self):
        report = self._fscReport()
        if report is None or not os.path.exists(self._jobPath(jobdir.MAP)):
            return None
        return (f"{report['resolution_A']:.2f} Å gold-standard resolution (FSC 0.143, masked and "
                f"phase-randomization corrected) from {report['n_particles']} particles, {report['symmetry']}")


def setVoxelSize(path, samplingRate):
    """Write the pixel size (Å) into an MRC header in place."""
    import mrcfile
    with mrcfile.open(path, mode="r+") as mrc:
        mrc.voxel_size = samplingRate


def copyAlignment(inputSet, outputSet, starFile, newImages=False):
    """Copy ``inputSet`` into ``outputSet`` with the poses and half-sets of ``starFile``
    (rows matched on rlnImageId, which relion.convert writes from the object ids). Particles
    the job left out (unusable images, listed in its log) have no row and are not copied.
    ``newImages``: the particles' images become the file's rlnImageName (relative to the project
    folder) and the file's rlnImageOriginalName is kept as ``_rlnImageOriginalName``."""
    import relion.convert as convert
    from emtable import Table
    from pyworkflow.object import String
    from relion.constants import PARTICLE_EXTRA_LABELS

    reader = convert.createReader(alignType=ALIGN_PROJ, pixelSize=inputSet.getSamplingRate())
    first = [True]
    table = Table(fileName=starFile, tableName="particles", types=convert.LABELS_DICT)  # read once
    rows = {int(row.rlnImageId): row for row in table}
    if len(rows) != len(table) or len(rows) > inputSet.getSize():
        raise ValueError(f"{starFile} has {len(table)} particles ({len(rows)} distinct rlnImageId), "
                         f"the input set {inputSet.getSize()}")

    def updateParticle(particle, _row=None):
        row = rows.get(particle.getObjId())
        particle._appendItem = row is not None     # set every time: the iterator may reuse the object
        if row is None:
            return
        reader.setParticleTransform(particle, row)
        if newImages:
            particle.setLocation(convert.relionToLocation(row.rlnImageName))
            particle._rlnImageOriginalName = String(row.rlnImageOriginalName)
        if first[0]:
            reader.createExtraLabels(particle, row, PARTICLE_EXTRA_LABELS)
            first[0] = False
        else:
            reader.setExtraLabels(particle, row)

    outputSet.copyItems(inputSet, updateItemCallback=updateParticle, doClone=False)
