// Python bindings of the grouping core: numpy int32 columns in, CSR groups (indices, offsets) out.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "grouping.h"
#include "rng.h"

namespace py = pybind11;
using omnibal::Groups;
using omnibal::Lengths;
using omnibal::Oversize;

namespace {

using Column = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using Ids = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using Costs = py::array_t<double, py::array::c_style | py::array::forcecast>;

Lengths view(const Column& vit, const Column& tokens) {
  if (vit.ndim() != 1 || tokens.ndim() != 1 || vit.shape(0) != tokens.shape(0))
    throw std::invalid_argument("vit and tokens must be 1-D arrays of equal length");
  return Lengths{vit.data(), tokens.data(), vit.shape(0)};
}

Oversize policy(const std::string& name) {
  if (name == "error") return Oversize::kError;
  if (name == "solo") return Oversize::kSolo;
  throw std::invalid_argument("oversize policy must be 'error' or 'solo', got '" + name + "'");
}

py::tuple to_python(Groups&& g) {
  auto indices = py::array_t<int64_t>(static_cast<py::ssize_t>(g.indices.size()), g.indices.data());
  auto offsets = py::array_t<int64_t>(static_cast<py::ssize_t>(g.offsets.size()), g.offsets.data());
  return py::make_tuple(indices, offsets, g.oversize);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "omnibal_pl grouping core: ISF, balanced and greedy-knapsack grouping, sample exchange within steps (CSR output: indices, offsets, oversize count)";
  py::register_exception<omnibal::OversizeError>(m, "OversizeError", PyExc_ValueError);

  m.def(
      "isf",
      [](const Column& vit, const Column& tokens, int32_t vit_cap, int32_t token_cap, int64_t token_threshold,
         int iterations, uint64_t seed, const std::string& oversize) {
        Lengths len = view(vit, tokens);
        Oversize p = policy(oversize);
        Groups g;
        {
          py::gil_scoped_release release;
          g = omnibal::isf(len, vit_cap, token_cap, token_threshold, iterations, seed, p);
        }
        return to_python(std::move(g));
      },
      py::arg("vit"), py::arg("tokens"), py::arg("vit_cap"), py::arg("token_cap"), py::arg("token_threshold"),
      py::arg("iterations"), py::arg("seed"), py::arg("oversize"));

  m.def(
      "balanced",
      [](const Column& vit, const Column& tokens, int32_t vit_cap, int32_t token_cap, int32_t vit_quantum,
         uint64_t seed, const std::string& oversize) {
        Lengths len = view(vit, tokens);
        Oversize p = policy(oversize);
        Groups g;
        {
          py::gil_scoped_release release;
          g = omnibal::balanced(len, vit_cap, token_cap, vit_quantum, seed, p);
        }
        return to_python(std::move(g));
      },
      py::arg("vit"), py::arg("tokens"), py::arg("vit_cap"), py::arg("token_cap"), py::arg("vit_quantum"),
      py::arg("seed"), py::arg("oversize"));

  m.def(
      "greedy_knapsack",
      [](const Column& vit, const Column& tokens, int32_t token_cap, uint64_t seed, const std::string& oversize) {
        Lengths len = view(vit, tokens);
        Oversize p = policy(oversize);
        Groups g;
        {
          py::gil_scoped_release release;
          g = omnibal::greedy_knapsack(len, token_cap, seed, p);
        }
        return to_python(std::move(g));
      },
      py::arg("vit"), py::arg("tokens"), py::arg("token_cap"), py::arg("seed"), py::arg("oversize"));

  m.def(
      "exchange_samples",
      [](const Column& vit, const Column& tokens, const Costs& cost, const Ids& indices, const Ids& offsets,
         const Ids& step_groups, int32_t vit_cap, int32_t token_cap, int sweeps) {
        Lengths len = view(vit, tokens);
        if (cost.ndim() != 1 || cost.shape(0) != len.n)
          throw std::invalid_argument("cost must be a 1-D array with one value per sample");
        if (indices.ndim() != 1 || offsets.ndim() != 1 || offsets.shape(0) < 1 || step_groups.ndim() != 3)
          throw std::invalid_argument("indices and offsets must be 1-D (CSR), step_groups [steps, dp, micro_batches]");
        const int64_t n_groups = offsets.shape(0) - 1;
        const int64_t* off = offsets.data();
        for (int64_t g = 0; g < n_groups; ++g)
          if (off[g] > off[g + 1]) throw std::invalid_argument("offsets must be non-decreasing");
        if (off[0] != 0 || off[n_groups] != indices.shape(0))
          throw std::invalid_argument("offsets must start at 0 and end at len(indices)");
        for (int64_t k = 0; k < indices.shape(0); ++k)
          if (indices.data()[k] < 0 || indices.data()[k] >= len.n)
            throw std::invalid_argument("indices must be sample ids in [0, len(vit))");
        omnibal::CsrGroups grouping{indices.data(), off, n_groups};
        Groups g;
        {
          py::gil_scoped_release release;
          g = omnibal::exchange_samples(len, cost.data(), grouping, step_groups.data(), step_groups.shape(0),
                                        static_cast<int32_t>(step_groups.shape(1)),
                                        static_cast<int32_t>(step_groups.shape(2)), vit_cap, token_cap, sweeps);
        }
        return to_python(std::move(g));
      },
      py::arg("vit"), py::arg("tokens"), py::arg("cost"), py::arg("indices"), py::arg("offsets"),
      py::arg("step_groups"), py::arg("vit_cap"), py::arg("token_cap"), py::arg("sweeps"));

  m.def(
      "shuffled_range",
      [](int64_t n, uint64_t seed) {
        std::vector<int64_t> v(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) v[i] = i;
        omnibal::SplitMix64(seed).shuffle(v);
        return py::array_t<int64_t>(static_cast<py::ssize_t>(n), v.data());
      },
      py::arg("n"), py::arg("seed"), "0..n-1 shuffled by the core's SplitMix64 (for RNG parity tests)");
}
