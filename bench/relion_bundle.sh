#!/bin/bash
# Build a relocatable copy of Debian's RELION 3.1.3 + Open MPI 4.1.4 in DIR (default .relion),
# to run bench/relion_autorefine.py on a machine without the package (the GPU device: 16 cores,
# no network). Needs `apt-get install -y relion` here; about 35 MB. Use it there with
#     . DIR/env.sh && python bench/bench_vs_relion.py ... --relion-mpi 5 --threads 4
# (the target needs glibc >= 2.36, Debian 12's).
set -euo pipefail
R=$(realpath -m "${1:-.relion}")
rm -rf "$R"; mkdir -p "$R/bin" "$R/lib/x86_64-linux-gnu"
for p in relion_refine_mpi relion_refine relion_preprocess relion_particle_subtract_mpi relion_postprocess; do cp "$(command -v $p)" "$R/bin/"; done
cp "$(readlink -f "$(command -v mpirun)")" "$R/bin/orterun"; ln -s orterun "$R/bin/mpirun"
cp -a /usr/lib/x86_64-linux-gnu/openmpi /usr/lib/x86_64-linux-gnu/pmix2 "$R/lib/x86_64-linux-gnu/"
mkdir -p "$R/share"; cp -a /usr/share/openmpi "$R/share/"
# every shared library the binaries and MCA plugins need, glibc itself excepted
find "$R" -type f \( -name "*.so*" -o -path "*/bin/*" \) -exec ldd {} + 2>/dev/null | awk '/=> \//{print $3}' | sort -u \
  | grep -vE "/(libc|libm|libpthread|libdl|librt|ld-linux-x86-64|libresolv)\.so" | while read -r lib; do
    case $lib in "$R"/*) ;; *) cp -L "$lib" "$R/lib/" ;; esac
  done
cat > "$R/env.sh" <<'ENV'
# source me: the relocated RELION 3.1.3 + Open MPI 4.1.4 (single node, no ssh)
R=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export OPAL_PREFIX=$R PMIX_INSTALL_PREFIX=$R/lib/x86_64-linux-gnu/pmix2
export PATH=$R/bin:$PATH
export LD_LIBRARY_PATH=$R/lib:$R/lib/x86_64-linux-gnu/openmpi/lib:$R/lib/x86_64-linux-gnu/pmix2/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export OMPI_MCA_plm=isolated OMPI_MCA_btl_vader_single_copy_mechanism=none OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mca_base_component_show_load_errors=0
ENV
du -sh "$R"
