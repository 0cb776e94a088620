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
  m.doc() = "omnibal_pl grouping core: ISF, balanced and greedy-knapsack grouping (CSR output: indices, offsets, oversize count)";
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
      "shuffled_range",
      [](int64_t n, uint64_t seed) {
        std::vector<int64_t> v(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) v[i] = i;
        omnibal::SplitMix64(seed).shuffle(v);
        return py::array_t<int64_t>(static_cast<py::ssize_t>(n), v.data());
      },
      py::arg("n"), py::arg("seed"), "0..n-1 shuffled by the core's SplitMix64 (for RNG parity tests)");
}
