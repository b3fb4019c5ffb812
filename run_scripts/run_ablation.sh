#!/usr/bin/env bash
# The ablation that credits LocMoE's parts (docs/results.md): on the default corpus, cluster scope
# (configs/cpu_tiny.yaml: one token group per data-parallel rank), every router at equal drops (<= 5 % of the
# valid tokens, both tiers calibrated from a pilot run), 3 seeds (6 where a setting says so), 150 steps:
#   iid      i.i.d. data (no level 1: moe.iid_level1 none): LocMoE (mu = 0.01), Switch, Hash, RRE
#   iid_mu0  the same LocMoE with mu = 0 (no learned locality term), 6 seeds
#   iid_6seeds Switch and Hash of `iid` at 6 seeds (the 3 more in the same folder; its report then lists
#            these two): a 2 % perplexity goal needs more than 3 seeds when the seeds' sd is 4-6 %
#   affine   domain-affine placement: LocMoE and RRE (the placement's locality)
#   affine_mu0 the same LocMoE with mu = 0
#   mu_sweep LocMoE on i.i.d. data at mu = 0.001 and 0.1, one seed each (0 and 0.01: the runs above)
#   iid_reroute      i.i.d., moe.reroute_overflow (beyond the paper): LocMoE and Switch, the overflow of a full
#                    pair taking free node-local slots; calibrated with it (equal_drops.rerouted_drop_rates)
#   iid_reroute_mu0  the same LocMoE with mu = 0 (rerouting without the learned locality term)
#   iid_reroute_rate10 i.i.d., LocMoE with reroute_overflow and moe.locality_bias_rate 10 (b stepped 10x as fast)
#   iid_rate10       the same without reroute_overflow, 6 seeds
#   affine_reroute   domain-affine placement, LocMoE with reroute_overflow and locality_bias_rate 10
#   affine_rate10    domain-affine placement, LocMoE with locality_bias_rate 10
#   mu_sweep_rate10  LocMoE on i.i.d. data at locality_bias_rate 10, mu = 0.1, 0.001 and 0.0001, one seed each
#   iid_reroute_d1   i.i.d., LocMoE with reroute_overflow calibrated at <= 1 % drops, 6 seeds (not 5 %: with rerouting the
#                    fewest rows at 5 % put the node-local tier under the mean share, C_l 61 of 64, and drop ~5 %
#                    of every group; at 1 % it holds the mean share and drops nothing)
#   iid_reroute_mu0_d1 the same with mu = 0 (rerouting alone, no learned locality term)
#   four_iid_reroute_d1 the same as iid_reroute_d1 on the four-domain corpus
#   iid_alpha0.05, iid_alpha0.1 i.i.d., LocMoE at rate 10 with the aux loss coefficient (alpha, eq. 5) at 0.05 and
#                    0.1 instead of 0.01: a group's split between its node's experts, which sets the node-local
#                    tier's headroom
#   iid_600          i.i.d., LocMoE (rate 10), Switch and Hash, 6 seeds, trained 600 steps instead of 150 (each calibrated from
#                    its own 600-step pilot): does the learned routers' gap to Hash close with training?
#   iid_600_mu0, iid_600_rre: the controls of iid_600 (3 seeds): the same LocMoE with mu = 0; RRE
#   iid_600_check    iid_600 at 3 seeds with check rounds (compare_routers --check-rounds, default 2): the tiers
#                    sized again from the seeds' own routed counts and every seed trained again at the new
#                    capacities, so that the measured drops, not only the pilot's prediction, meet the 5 % target
#   iid_check        the same at 150 steps, 6 seeds
#   iid_600_reroute_d1 LocMoE with reroute_overflow calibrated at <= 1 % drops, 600 steps, 3 seeds, check rounds
# Settings listed before iid_600_check were run (at the commits docs/results.md names) with the pilot's
# calibration alone (--check-rounds 0 trains the same runs); a learned router's measured drops then overshoot the target.
# four_iid and four_iid_rate10 were measured again with check rounds at 29402df, four_affine and four_affine_mu0
# at e2109c1 (docs/results.md).
#   four_affine, four_affine_mu0: the four-domain corpus with the domain-affine placement (a node per domain):
#                    LocMoE (rate 10) and RRE; the same LocMoE with mu = 0
#   four_iid, four_iid_rate10, four_iid_mu0: on the four-domain corpus (pangu_sigma.data.four_domain_corpus,
#                    3 MB, built into output/data/four_domains), i.i.d.: Switch and Hash; LocMoE with
#                    locality_bias_rate 10; the same with mu = 0
# Usage: bash run_scripts/run_ablation.sh [SETTING ...]   (default: all; outputs in output/ablation/SETTING)
# Each setting reruns only what is missing (--reuse). About 6 CPU-hours on 2 cores for everything.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
source "$repo/run_scripts/venv.sh"
cd "$repo"
[ -f output/data/default/meta.json ] || bash run_scripts/run_cpu_smoke.sh >/dev/null  # builds the default corpus
settings=("$@")
all_settings=(iid iid_6seeds iid_mu0 affine affine_mu0 mu_sweep iid_reroute iid_reroute_mu0 affine_reroute affine_rate10
              iid_reroute_rate10 iid_rate10 mu_sweep_rate10 four_iid four_iid_rate10 four_iid_mu0
              iid_reroute_d1 iid_reroute_mu0_d1 four_iid_reroute_d1 iid_alpha0.05 iid_alpha0.1 iid_600 iid_600_mu0 iid_600_rre iid_600_check iid_check iid_600_reroute_d1 four_affine
              four_affine_mu0)
[ ${#settings[@]} -gt 0 ] || settings=("${all_settings[@]}")
for setting in "${settings[@]}"; do  # every name checked before the first run starts
    [[ " ${all_settings[*]} " == *" $setting "* ]] && continue
    echo "run_ablation.sh: unknown setting '$setting'; valid: ${all_settings[*]}" >&2
    exit 2
done
rate1=(--set moe.locality_bias_rate=1)  # the settings measured before moe.locality_bias_rate (cpu_tiny now has 10)
four_affine=(--set data.dataset_dir=output/data/four_domains --set "moe.domain_to_group=[0, 1, 0, 1]")
four=("${four_affine[@]}" --set data.placement=iid)
if [[ " ${settings[*]} " == *" four_"* ]] && [ ! -f output/data/four_domains/meta.json ]; then
    "$PY" -m pangu_sigma.data.four_domain_corpus --output output/corpus/four_domains --max-bytes 3000000 --overwrite
    "$PY" -m pangu_sigma.data.prepare --input output/corpus/four_domains --output output/data/four_domains \
        --vocab-size 2000 --seq-length 64 --valid-fraction 0.02 --overwrite
fi
compare=("$PY" -m pangu_sigma.tools.compare_routers --config configs/cpu_tiny.yaml --steps 150 --quiet --reuse
         --clusters 64,128)
for setting in "${settings[@]}"; do
    out=output/ablation/$setting
    case $setting in
        iid) "${compare[@]}" --output "$out" --routers locmoe,switch,hash,rre --seeds 3 --equal-drops 5 \
                 --set data.placement=iid "${rate1[@]}" ;;
        iid_6seeds) "${compare[@]}" --output output/ablation/iid --routers switch,hash --seeds 6 --equal-drops 5 \
                 --set data.placement=iid "${rate1[@]}" ;;
        iid_mu0) "${compare[@]}" --output "$out" --routers locmoe --seeds 6 --equal-drops 5 \
                 --set data.placement=iid --set moe.locality_loss_coef=0 ;;
        affine) "${compare[@]}" --output "$out" --routers locmoe,rre --seeds 3 --equal-drops 5 "${rate1[@]}" ;;
        affine_mu0) "${compare[@]}" --output "$out" --routers locmoe --seeds 3 --equal-drops 5 \
                 --set moe.locality_loss_coef=0 ;;
        mu_sweep) for mu in 0.001 0.1; do
                 "${compare[@]}" --output "$out/mu$mu" --routers locmoe --seeds 1 --equal-drops 5 \
                     --set data.placement=iid --set moe.locality_loss_coef=$mu "${rate1[@]}"
             done ;;
        iid_reroute) "${compare[@]}" --output "$out" --routers locmoe,switch --seeds 3 --equal-drops 5 \
                 --set data.placement=iid --set moe.reroute_overflow=true "${rate1[@]}" ;;
        iid_reroute_mu0) "${compare[@]}" --output "$out" --routers locmoe --seeds 3 --equal-drops 5 \
                 --set data.placement=iid --set moe.reroute_overflow=true --set moe.locality_loss_coef=0 ;;
        affine_reroute) "${compare[@]}" --output "$out" --routers locmoe --seeds 3 --equal-drops 5 \
                 --set moe.reroute_overflow=true --set moe.locality_bias_rate=10 ;;
        iid_reroute_rate10) "${compare[@]}" --output "$out" --routers locmoe --seeds 3 --equal-drops 5 \
                 --set data.placement=iid --set moe.reroute_overflow=true --set moe.locality_bias_rate=10 ;;
        affine_rate10) "${compare[@]}" --output "$out" --routers locmoe --seeds 3 --equal-drops 5 \
                 --set moe.locality_bias_rate=10 ;;
        iid_rate10) "${compare[@]}" --output "$out" --routers locmoe --seeds 6 --equal-drops 5 \
                 --set data.placement=iid --set moe.locality_bias_rate=10 ;;
        four_iid) "${compare[@]}" --output "$out" --routers switch,hash --seeds 3 --equal-drops 5 "${four[@]}" \
                 "${rate1[@]}" ;;  # (rate 1: as measured first; neither router has the locality bias)
        mu_sweep_rate10) for mu in 0.001 0.0001 0.1; do
                 "${compare[@]}" --output "$out/mu$mu" --routers locmoe --seeds 1 --equal-drops 5 \
                     --set data.placement=iid --set moe.locality_bias_rate=10 --set moe.locality_loss_coef=$mu
             done ;;
        four_iid_rate10) "${compare[@]}" --output "$out" --routers locmoe --seeds 3 --equal-drops 5 "${four[@]}" \
                 --set moe.locality_bias_rate=10 ;;
        four_iid_mu0) "${compare[@]}" --output "$out" --routers locmoe --seeds 3 --equal-drops 5 "${four[@]}" \
                 --set moe.locality_loss_coef=0 ;;
        iid_reroute_d1) "${compare[@]}" --output "$out" --routers locmoe --seeds 6 --equal-drops 1 \
                 --set data.placement=iid --set moe.reroute_overflow=true --set moe.locality_bias_rate=10 ;;
        iid_reroute_mu0_d1) "${compare[@]}" --output "$out" --routers locmoe --seeds 3 --equal-drops 1 \
                 --set data.placement=iid --set moe.reroute_overflow=true --set moe.locality_loss_coef=0 ;;
        four_iid_reroute_d1) "${compare[@]}" --output "$out" --routers locmoe --seeds 3 --equal-drops 1 \
                 "${four[@]}" --set moe.reroute_overflow=true --set moe.locality_bias_rate=10 ;;
        iid_alpha*) "${compare[@]}" --output "$out" --routers locmoe --seeds 3 --equal-drops 5 \
                 --set data.placement=iid --set moe.locality_bias_rate=10 --set "moe.aux_loss_coef=${setting#iid_alpha}" ;;
        iid_600) "${compare[@]}" --output "$out" --routers locmoe,switch,hash --seeds 6 --equal-drops 5 \
                 --set data.placement=iid --steps 600 ;;
        iid_600_mu0) "${compare[@]}" --output "$out" --routers locmoe --seeds 3 --equal-drops 5 \
                 --set data.placement=iid --steps 600 --set moe.locality_loss_coef=0 ;;
        iid_600_rre) "${compare[@]}" --output "$out" --routers rre --seeds 3 --equal-drops 5 \
                 --set data.placement=iid --steps 600 ;;
        iid_600_check) "${compare[@]}" --output "$out" --routers locmoe,switch,hash --seeds 3 --equal-drops 5 \
                 --check-rounds 2 --set data.placement=iid --steps 600 ;;
        iid_check) "${compare[@]}" --output "$out" --routers locmoe,switch,hash --seeds 6 --equal-drops 5 \
                 --check-rounds 2 --set data.placement=iid ;;
        iid_600_reroute_d1) "${compare[@]}" --output "$out" --routers locmoe --seeds 3 --equal-drops 1 \
                 --check-rounds 2 --set data.placement=iid --set moe.reroute_overflow=true --steps 600 ;;
        four_affine) "${compare[@]}" --output "$out" --routers locmoe,rre --seeds 3 --equal-drops 5 "${four_affine[@]}" ;;
        four_affine_mu0) "${compare[@]}" --output "$out" --routers locmoe --seeds 3 --equal-drops 5 \
                 "${four_affine[@]}" --set moe.locality_loss_coef=0 ;;
        *) echo "run_ablation.sh: setting '$setting' is listed but has no commands" >&2
           exit 2 ;;
    esac
done
