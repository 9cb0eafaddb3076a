// examples/tour_plots.hpp — the tour's pictures: each figure is a gnuplot data file and script written
// into the output folder, rendered to PNG by gnuplot when it is on PATH, and listed in index.md in the
// order the tour made them. Without gnuplot the data and scripts are still written (render them later
// with `gnuplot NAME.gp` in that folder) and the tour says the pictures were skipped.
//
//   tour_plots::plotter plots("tour-out");
//   plots.add({.name = "01-base", .title = "...", .xlabel = "step", .ylabel = "loss",
//              .lines = {{.title = "train loss", .x = xs, .y = ys}}, .caption = "..."});
//   plots.finish();  // index.md; returns the PNGs written
#pragma once

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace tour_plots {

struct line {
  std::string title = {};
  std::vector<double> x = {}, y = {};
  std::vector<double> err = {};  ///< empty, or ± per point (drawn as error bars)
  bool y2 = false;               ///< against the right-hand axis
  bool points = false;           ///< points on the line (sparse evaluations)
  bool dashed = false;           ///< a reference line
};

struct figure {
  std::string name = {};  ///< file stem: NAME.dat, NAME.gp, NAME.png
  std::string title = {}, xlabel = {}, ylabel = {}, y2label = {};
  std::vector<line> lines = {};
  std::string caption = {};  ///< one or two sentences for index.md
  bool logx = false, logy = false;
};

class plotter {
 public:
  /// Creates `dir`; an empty dir turns the plotter off (nothing written).
  explicit plotter(std::string dir) : dir_(std::move(dir)) {
    if (dir_.empty()) return;
    // The folder is quoted in a shell command below: refuse the one character that would end the quote.
    if (dir_.find('\'') != std::string::npos)
      throw std::invalid_argument("tour: --out " + dir_ + " contains a single quote; choose another folder name");
    std::filesystem::create_directories(dir_);
    gnuplot_ = std::system("command -v gnuplot >/dev/null 2>&1") == 0;
  }
  bool enabled() const { return !dir_.empty(); }
  bool rendering() const { return enabled() && gnuplot_; }
  std::string folder() const { return enabled() ? std::filesystem::absolute(dir_).string() : std::string(); }

  /// Writes NAME.dat and NAME.gp and, with gnuplot, renders NAME.png.
  void add(const figure& f) {
    if (!enabled()) return;
    write_data(f);
    write_script(f);
    bool ok = false;
    if (gnuplot_) {
      const std::string cmd = "cd '" + dir_ + "' && gnuplot '" + f.name + ".gp' 2>&1";
      ok = std::system(cmd.c_str()) == 0 && std::filesystem::exists(path(f.name + ".png"));
      if (!ok) std::printf("  note: gnuplot could not render %s.png\n", f.name.c_str());
    }
    figures_.push_back({f, ok});
  }

  /// Writes index.md (every figure in order, with its caption) and returns the PNGs written.
  std::vector<std::string> finish(const std::string& heading) {
    std::vector<std::string> pngs;
    if (!enabled()) return pngs;
    std::ofstream md(path("index.md"));
    md << "# " << heading << "\n\n";
    if (!gnuplot_)
      md << "gnuplot was not found, so the pictures were not rendered: each figure's data (`.dat`) and "
            "gnuplot script (`.gp`) are here; run `gnuplot NAME.gp` in this folder to draw it.\n\n";
    for (const auto& [f, ok] : figures_) {
      md << "## " << f.title << "\n\n" << f.caption << "\n\n";
      if (ok) {
        md << "![" << f.title << "](" << f.name << ".png)\n\n";
        pngs.push_back(f.name + ".png");
      } else {
        md << "(not rendered: `" << f.name << ".gp`, `" << f.name << ".dat`)\n\n";
      }
    }
    return pngs;
  }

 private:
  std::string path(const std::string& file) const { return (std::filesystem::path(dir_) / file).string(); }

  // One block per line, separated by two blank lines (gnuplot's `index`).
  void write_data(const figure& f) const {
    std::ofstream out(path(f.name + ".dat"));
    for (std::size_t i = 0; i < f.lines.size(); ++i) {
      const auto& l = f.lines[i];
      out << "# " << l.title << "\n";
      for (std::size_t k = 0; k < l.x.size() && k < l.y.size(); ++k) {
        out << l.x[k] << ' ' << l.y[k];
        if (!l.err.empty()) out << ' ' << (k < l.err.size() ? l.err[k] : 0.0);
        out << '\n';
      }
      out << "\n\n";
    }
  }

  static std::string quoted(const std::string& s) {
    std::string q = "\"";
    for (char c : s) {
      if (c == '"' || c == '\\') q += '\\';
      q += c;
    }
    return q + "\"";
  }

  void write_script(const figure& f) const {
    std::ofstream gp(path(f.name + ".gp"));
    gp << "set terminal pngcairo size 900,520 noenhanced font 'sans,11'\n"
       << "set output " << quoted(f.name + ".png") << "\n"
       << "set title " << quoted(f.title) << "\n"
       << "set xlabel " << quoted(f.xlabel) << "\n"
       << "set ylabel " << quoted(f.ylabel) << "\n"
       << "set key outside bottom center horizontal\n"
       << "set grid\n";
    if (f.logx) gp << "set logscale x 2\n";
    if (f.logy) gp << "set logscale y\n";
    if (!f.y2label.empty()) gp << "set y2label " << quoted(f.y2label) << "\nset y2tics\nset ytics nomirror\n";
    gp << "plot ";
    for (std::size_t i = 0; i < f.lines.size(); ++i) {
      const auto& l = f.lines[i];
      if (i > 0) gp << ", \\\n     ";
      gp << quoted(f.name + ".dat") << " index " << i;
      if (!l.err.empty())
        gp << " using 1:2:3 with yerrorlines";
      else
        gp << " using 1:2 with " << (l.points ? "linespoints pt 7 ps 1.2" : "lines");
      gp << " lw 2" << (l.dashed ? " dt 2" : "") << " axes x1" << (l.y2 ? "y2" : "y1") << " title " << quoted(l.title);
    }
    gp << "\n";
  }

  std::string dir_;
  bool gnuplot_ = false;
  std::vector<std::pair<figure, bool>> figures_;
};

}  // namespace tour_plots
