"""PDEBench's 11 forward problems: keys, channels, file names and published parameter values.

Names and values follow PDEBench (Takamoto et al., NeurIPS 2022 Datasets and Benchmarks):
its download table ``pdebench/data_download/pdebench_data_urls.csv`` for file names and its
data-generation configs for parameters. ``generatable`` says whether this package can write
synthetic data for the problem (:mod:`expflow_flows.pde.generate`); the others are listed so
that real PDEBench files can be named and recognised, not generated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from expflow_flows.errors import ExpflowError

ParamValue = float | str


@dataclass(frozen=True)
class PDEParam:
    """One PDE parameter: its name, PDEBench's published values and the default used here."""

    name: str
    symbol: str
    description: str
    values: tuple[ParamValue, ...]
    default: ParamValue


@dataclass(frozen=True)
class Problem:
    """One PDEBench forward problem."""

    key: str
    title: str
    pdebench_name: str  # the --pde_name of PDEBench's download script
    dims: int
    channels: tuple[str, ...]
    equation: str
    file_patterns: tuple[str, ...]
    layout: str  # how a file stores the data: "tensor", "cfd", "darcy", "groups", "ns_incom"
    params: tuple[PDEParam, ...] = ()
    domain: tuple[float, float] | None = None  # spatial extent of each axis
    t_final: float | None = None
    resolution: tuple[int, ...] | None = None  # published spatial grid
    n_frames: int | None = None  # published number of stored time frames
    generatable: bool = False
    notes: str = ""
    published_files: tuple[str, ...] = field(default=(), repr=False)

    def param(self, name: str) -> PDEParam:
        """The parameter called ``name``; an unknown name is an ExpflowError."""
        for p in self.params:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.params) or "none"
        raise ExpflowError(
            f"problem {self.key!r} has no parameter {name!r}; its parameters: {known}"
        )

    def defaults(self) -> dict[str, ParamValue]:
        """Default value of every parameter."""
        return {p.name: p.default for p in self.params}

    def file_name(self, **values: ParamValue) -> str:
        """PDEBench's file name for these parameter values (defaults fill the gaps)."""
        merged = self.defaults()
        for name, value in values.items():
            self.param(name)
            merged[name] = value
        tokens = {k: format_value(v) for k, v in merged.items()}
        try:
            return self.file_patterns[0].format(**tokens)
        except KeyError as exc:  # a pattern placeholder that is not a parameter
            raise ExpflowError(
                f"problem {self.key!r}: file pattern {self.file_patterns[0]!r} needs {exc}"
            ) from None


def format_value(value: ParamValue) -> str:
    """A parameter value as it appears in PDEBench's file names (``0.4``, ``1.0``, ``0.001``)."""
    if isinstance(value, str):
        return value
    return str(float(value))


_ADVECTION_BETA = (0.1, 0.2, 0.4, 0.7, 1.0, 2.0, 4.0, 7.0)
_BURGERS_NU = (0.001, 0.002, 0.004, 0.01, 0.02, 0.04, 0.1, 0.2, 0.4, 1.0, 2.0, 4.0)
_REACDIFF_NU = (0.5, 1.0, 2.0, 5.0)
_REACDIFF_RHO = (1.0, 2.0, 5.0, 10.0)
_DARCY_BETA = (0.01, 0.1, 1.0, 10.0, 100.0)

PROBLEMS: tuple[Problem, ...] = (
    Problem(
        key="advection",
        title="1D advection",
        pdebench_name="advection",
        dims=1,
        channels=("u",),
        equation="u_t + beta * u_x = 0, periodic on [0, 1)",
        file_patterns=("1D_Advection_Sols_beta{beta}.hdf5",),
        layout="tensor",
        params=(PDEParam("beta", "β", "advection speed", _ADVECTION_BETA, 0.4),),
        domain=(0.0, 1.0),
        t_final=2.0,
        resolution=(1024,),
        n_frames=201,
        generatable=True,
        published_files=tuple(f"1D_Advection_Sols_beta{b}.hdf5" for b in _ADVECTION_BETA),
    ),
    Problem(
        key="burgers",
        title="1D Burgers",
        pdebench_name="burgers",
        dims=1,
        channels=("u",),
        equation="u_t + (u^2/2)_x = (nu/pi) * u_xx, periodic on [0, 1)",
        file_patterns=("1D_Burgers_Sols_Nu{nu}.hdf5",),
        layout="tensor",
        params=(PDEParam("nu", "ν", "viscosity (PDEBench divides it by pi)", _BURGERS_NU, 0.01),),
        domain=(0.0, 1.0),
        t_final=2.0,
        resolution=(1024,),
        n_frames=201,
        generatable=True,
        published_files=tuple(f"1D_Burgers_Sols_Nu{n}.hdf5" for n in _BURGERS_NU),
    ),
    Problem(
        key="diffusion_reaction_1d",
        title="1D diffusion-reaction",
        pdebench_name="1d_reacdiff",
        dims=1,
        channels=("u",),
        equation="u_t = nu * u_xx + rho * u * (1 - u), periodic on [0, 1)",
        file_patterns=("ReacDiff_Nu{nu}_Rho{rho}.hdf5",),
        layout="tensor",
        params=(
            PDEParam("nu", "ν", "diffusion coefficient", _REACDIFF_NU, 0.5),
            PDEParam("rho", "ρ", "reaction rate (0 gives the heat equation)", _REACDIFF_RHO, 1.0),
        ),
        domain=(0.0, 1.0),
        t_final=1.0,
        resolution=(1024,),
        n_frames=101,
        generatable=True,
        notes="rho=0 is pure diffusion (heat equation), solved exactly in Fourier space",
        published_files=tuple(
            f"ReacDiff_Nu{n}_Rho{r}.hdf5" for n in _REACDIFF_NU for r in _REACDIFF_RHO
        ),
    ),
    Problem(
        key="diffusion_sorption",
        title="1D diffusion-sorption",
        pdebench_name="diff_sorp",
        dims=1,
        channels=("u",),
        equation="u_t = D / R(u) * u_xx, R(u) = 1 + (1-phi)/phi * rho_s * k_f * n_f * u^(n_f-1)",
        file_patterns=("1D_diff-sorp_NA_NA.h5",),
        layout="groups",
        params=(
            PDEParam("D", "D", "effective diffusion coefficient", (5e-4,), 5e-4),
            PDEParam("por", "φ", "porosity", (0.29,), 0.29),
            PDEParam("rho_s", "ρ_s", "bulk density", (2880.0,), 2880.0),
            PDEParam("k_f", "k_f", "Freundlich parameter", (3.5e-4,), 3.5e-4),
            PDEParam("n_f", "n_f", "Freundlich exponent", (0.874,), 0.874),
        ),
        domain=(0.0, 1.0),
        t_final=500.0,
        resolution=(1024,),
        n_frames=101,
        notes="one HDF5 group per sample ('0000/data' [t, x, 1], '0000/grid/x', '0000/grid/t')",
        published_files=("1D_diff-sorp_NA_NA.h5",),
    ),
    Problem(
        key="cfd_1d",
        title="1D compressible Navier-Stokes",
        pdebench_name="1d_cfd",
        dims=1,
        channels=("density", "pressure", "Vx"),
        equation="compressible Navier-Stokes, gamma=5/3, shear viscosity eta, bulk viscosity zeta",
        file_patterns=("1D_CFD_{init}_Eta{eta}_Zeta{zeta}_{bc}_Train.hdf5",),
        layout="cfd",
        params=(
            PDEParam("eta", "η", "shear viscosity", ("1.e-8", "0.01", "0.1"), "0.01"),
            PDEParam("zeta", "ζ", "bulk viscosity", ("1.e-8", "0.01", "0.1"), "0.01"),
            PDEParam("init", "", "initial condition", ("Rand", "Shock"), "Rand"),
            PDEParam("bc", "", "boundary condition", ("periodic", "trans"), "periodic"),
        ),
        domain=(-1.0, 1.0),
        t_final=1.0,
        resolution=(1024,),
        n_frames=101,
        published_files=(
            "1D_CFD_Rand_Eta0.01_Zeta0.01_periodic_Train.hdf5",
            "1D_CFD_Rand_Eta0.1_Zeta0.1_periodic_Train.hdf5",
            "1D_CFD_Rand_Eta1.e-8_Zeta1.e-8_periodic_Train.hdf5",
            "1D_CFD_Rand_Eta1.e-8_Zeta1.e-8_trans_Train.hdf5",
            "1D_CFD_Shock_Eta1.e-8_Zeta1.e-8_trans_Train.hdf5",
        ),
    ),
    Problem(
        key="diffusion_reaction_2d",
        title="2D diffusion-reaction (FitzHugh-Nagumo)",
        pdebench_name="2d_reacdiff",
        dims=2,
        channels=("u", "v"),
        equation="u_t = Du*lap(u) + u - u^3 - k - v, v_t = Dv*lap(v) + u - v, no-flux boundaries",
        file_patterns=("2D_diff-react_NA_NA.h5",),
        layout="groups",
        params=(
            PDEParam("Du", "D_u", "activator diffusion", (1e-3,), 1e-3),
            PDEParam("Dv", "D_v", "inhibitor diffusion", (5e-3,), 5e-3),
            PDEParam("k", "k", "reaction constant", (5e-3,), 5e-3),
        ),
        domain=(-1.0, 1.0),
        t_final=5.0,
        resolution=(128, 128),
        n_frames=101,
        published_files=("2D_diff-react_NA_NA.h5",),
    ),
    Problem(
        key="darcy",
        title="2D Darcy flow",
        pdebench_name="darcy",
        dims=2,
        channels=("nu", "u"),
        equation="-div(a(x) grad u(x)) = beta on (0, 1)^2, u = 0 on the boundary (steady state)",
        file_patterns=("2D_DarcyFlow_beta{beta}_Train.hdf5",),
        layout="darcy",
        params=(PDEParam("beta", "β", "constant forcing", _DARCY_BETA, 1.0),),
        domain=(0.0, 1.0),
        resolution=(128, 128),
        n_frames=1,
        notes="'nu' [N, x, y] is the coefficient a(x) (input), 'tensor' [N, 1, x, y] the solution",
        published_files=tuple(f"2D_DarcyFlow_beta{b}_Train.hdf5" for b in _DARCY_BETA),
    ),
    Problem(
        key="cfd_2d",
        title="2D compressible Navier-Stokes",
        pdebench_name="2d_cfd",
        dims=2,
        channels=("density", "pressure", "Vx", "Vy"),
        equation="compressible Navier-Stokes, gamma=5/3, Mach number M, viscosities eta and zeta",
        file_patterns=("2D_CFD_{init}_M{M}_Eta{eta}_Zeta{zeta}_periodic_{res}_Train.hdf5",),
        layout="cfd",
        params=(
            PDEParam("M", "M", "Mach number", (0.1, 1.0), 0.1),
            PDEParam("eta", "η", "shear viscosity", ("1e-08", "0.01", "0.1"), "0.01"),
            PDEParam("zeta", "ζ", "bulk viscosity", ("1e-08", "0.01", "0.1"), "0.01"),
            PDEParam("init", "", "initial condition", ("Rand", "Turb"), "Rand"),
            PDEParam("res", "", "grid size per axis", ("128", "512"), "128"),
        ),
        domain=(0.0, 1.0),
        t_final=1.0,
        resolution=(128, 128),
        n_frames=21,
        published_files=(
            "2D_CFD_Rand_M0.1_Eta0.01_Zeta0.01_periodic_128_Train.hdf5",
            "2D_CFD_Rand_M0.1_Eta0.1_Zeta0.1_periodic_128_Train.hdf5",
            "2D_CFD_Rand_M0.1_Eta1e-08_Zeta1e-08_periodic_512_Train.hdf5",
            "2D_CFD_Rand_M1.0_Eta0.01_Zeta0.01_periodic_128_Train.hdf5",
            "2D_CFD_Rand_M1.0_Eta0.1_Zeta0.1_periodic_128_Train.hdf5",
            "2D_CFD_Rand_M1.0_Eta1e-08_Zeta1e-08_periodic_512_Train.hdf5",
            "2D_CFD_Turb_M0.1_Eta1e-08_Zeta1e-08_periodic_512_Train.hdf5",
            "2D_CFD_Turb_M1.0_Eta1e-08_Zeta1e-08_periodic_512_Train.hdf5",
        ),
    ),
    Problem(
        key="shallow_water",
        title="2D shallow water (radial dam break)",
        pdebench_name="swe",
        dims=2,
        channels=("h",),
        equation="shallow-water equations, gravity g, radial dam break",
        file_patterns=("2D_rdb_NA_NA.h5",),
        layout="groups",
        params=(
            PDEParam("gravity", "g", "gravitational acceleration", (1.0,), 1.0),
            PDEParam("inner_height", "h_in", "water height inside the dam", (2.0,), 2.0),
            PDEParam("dam_radius", "r", "dam radius (sampled per seed)", (0.5,), 0.5),
        ),
        domain=(-2.5, 2.5),
        t_final=1.0,
        resolution=(128, 128),
        n_frames=101,
        published_files=("2D_rdb_NA_NA.h5",),
    ),
    Problem(
        key="ns_incom",
        title="2D incompressible Navier-Stokes (inhomogeneous forcing)",
        pdebench_name="ns_incom",
        dims=2,
        channels=("Vx", "Vy"),
        equation="incompressible Navier-Stokes with random forcing, viscosity nu",
        file_patterns=("ns_incom_inhom_2d_512-{index}.h5",),
        layout="ns_incom",
        params=(
            PDEParam("nu", "ν", "kinematic viscosity", (0.01,), 0.01),
            PDEParam("index", "", "shard number of the file", ("0",), "0"),
        ),
        domain=(0.0, 1.0),
        resolution=(512, 512),
        notes="274 shards; datasets 'velocity' [batch, t, x, y, 2], 'particles', 'force', 't'",
    ),
    Problem(
        key="cfd_3d",
        title="3D compressible Navier-Stokes",
        pdebench_name="3d_cfd",
        dims=3,
        channels=("density", "pressure", "Vx", "Vy", "Vz"),
        equation="compressible Navier-Stokes, gamma=5/3, Mach number M, viscosities eta and zeta",
        file_patterns=("3D_CFD_{init}_M{M}_Eta{eta}_Zeta{zeta}_periodic_Train.hdf5",),
        layout="cfd",
        params=(
            PDEParam("M", "M", "Mach number", (1.0,), 1.0),
            PDEParam("eta", "η", "shear viscosity", ("1e-08",), "1e-08"),
            PDEParam("zeta", "ζ", "bulk viscosity", ("1e-08",), "1e-08"),
            PDEParam("init", "", "initial condition", ("Rand", "Turb"), "Rand"),
        ),
        domain=(0.0, 1.0),
        t_final=1.0,
        resolution=(128, 128, 128),
        n_frames=21,
        published_files=(
            "3D_CFD_Rand_M1.0_Eta1e-08_Zeta1e-08_periodic_Train.hdf5",
            "3D_CFD_Turb_M1.0_Eta1e-08_Zeta1e-08_periodic_Train.hdf5",
        ),
    ),
)

_BY_KEY = {p.key: p for p in PROBLEMS}


def problem_keys() -> tuple[str, ...]:
    """Keys of all registered problems, in PDEBench's order."""
    return tuple(_BY_KEY)


def generatable_keys() -> tuple[str, ...]:
    """Keys of the problems this package can generate synthetic data for."""
    return tuple(p.key for p in PROBLEMS if p.generatable)


def get_problem(key: str) -> Problem:
    """The problem called ``key``; an unknown key is an ExpflowError listing the known keys."""
    problem = _BY_KEY.get(key) if isinstance(key, str) else None
    if problem is None:
        raise ExpflowError(
            f"PDE problem {key!r} is not known; known problems: {', '.join(_BY_KEY)}"
        )
    return problem


def find_problem_for_file(name: str) -> Problem | None:
    """The problem whose PDEBench file names match ``name`` (a bare file name), or None."""
    for problem in PROBLEMS:
        if name in problem.published_files:
            return problem
        prefix = problem.file_patterns[0].split("{", 1)[0]
        if "{" in problem.file_patterns[0] and prefix and name.startswith(prefix):
            return problem
    return None
