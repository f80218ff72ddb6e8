"""Ground-truth maps from atomic models with gemmi's electron-scattering density
calculator (``gemmi.DensityCalculatorE``). gemmi is an optional dependency."""
from __future__ import annotations

import numpy as np

from .errors import CryocvError


def map_from_model(model_path: str, box_size: int, pixel_size_A: float, resolution_A: float | None = None,
                   center: bool = True) -> np.ndarray:
    """Electron-scattering potential of a PDB/mmCIF model on a (N, N, N) [z, y, x] grid.

    The model's centre of mass is moved to the box centre (index N//2) when
    ``center``; ``resolution_A`` (default 2 × pixel) sets gemmi's blurring.
    """
    try:
        import gemmi
    except ImportError:  # pragma: no cover
        raise CryocvError("map_from_model needs gemmi: pip install gemmi") from None
    st = gemmi.read_structure(model_path)
    st.setup_entities()
    st.remove_ligands_and_waters()
    st.remove_hydrogens()
    model = st[0]
    if center:
        com = model.calculate_center_of_mass()
        box_center = (box_size // 2) * pixel_size_A
        model.transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(
            box_center - com.x, box_center - com.y, box_center - com.z)))
    calc = gemmi.DensityCalculatorE()
    calc.d_min = resolution_A or 2.0 * pixel_size_A
    calc.rate = 1.0
    edge = box_size * pixel_size_A
    calc.grid.unit_cell = gemmi.UnitCell(edge, edge, edge, 90, 90, 90)
    calc.grid.spacegroup = gemmi.SpaceGroup("P1")
    calc.grid.set_size(box_size, box_size, box_size)
    calc.set_refmac_compatible_blur(model)
    calc.grid.fill(0.0)
    calc.add_model_density_to_grid(model)
    calc.grid.symmetrize_sum()
    # gemmi grids are indexed [x, y, z]; MRC arrays are [z, y, x]
    return np.ascontiguousarray(np.asarray(calc.grid).transpose(2, 1, 0), dtype=np.float32)
