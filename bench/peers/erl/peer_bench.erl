%% Erlang/OTP distribution baseline for `python -m bench peers` (bench/peers/erlang.py).
%%
%% Two nodes on this machine: the Python driver starts node B with `-run peer_bench serve`
%% and node A with `-run peer_bench main Other Params...`. A measures, against processes
%% on B (distribution over loopback TCP) and on A itself, what the process suite measures
%% for hpcproc, prints one `result NAME V1 V2 ...` line per figure (seconds per round trip,
%% or events per second, one value per timed run), then stops B and itself. B halts by
%% itself when A disconnects or after a deadline, so that no node outlives a failed run.
-module(peer_bench).
-export([main/1, serve/0, echo/0, sink/0, noop/0]).

-define(DEADLINE_MS, 600000).

serve() ->
    ok = net_kernel:monitor_nodes(true),
    spawn(fun() -> timer:sleep(?DEADLINE_MS), erlang:halt(3) end),
    serve_wait().

serve_wait() ->
    receive
        {nodeup, _} -> serve_wait();
        {nodedown, _} -> erlang:halt(0)
    end.

echo() ->
    receive
        stop -> ok;
        {From, Payload} -> From ! Payload, echo()
    end.

sink() ->
    receive
        stop -> ok;
        {count, N, From} -> drain(N), From ! done, sink()
    end.

drain(0) -> ok;
drain(N) -> receive _ -> drain(N - 1) end.

noop() -> ok.

now_s() -> erlang:monotonic_time(nanosecond) / 1.0e9.

%% Args: Other Iters Runs Warmup BigSize BigIters RateCount RateRuns SpawnCount LocalSpawn
main([OtherS | Rest]) ->
    spawn(fun() -> timer:sleep(?DEADLINE_MS), erlang:halt(3) end),
    [Iters, Runs, Warmup, BigSize, BigIters, RateCount, RateRuns, SpawnCount, LocalSpawn] =
        [list_to_integer(S) || S <- Rest],
    Other = list_to_atom(OtherS),
    connect(Other, erlang:monotonic_time(millisecond) + 60000),
    {module, peer_bench} = rpc:call(Other, code, ensure_loaded, [peer_bench]),
    Echo = spawn(Other, peer_bench, echo, []),
    Sink = spawn(Other, peer_bench, sink, []),
    LEcho = spawn(peer_bench, echo, []),
    LSink = spawn(peer_bench, sink, []),
    Small = binary:copy(<<"x">>, 8),
    Big = binary:copy(<<0>>, BigSize),
    report(rtt_remote, rtt(Echo, Small, Iters, Runs, Warmup)),
    report(rtt_remote_big, rtt(Echo, Big, BigIters, Runs, 1)),
    report(rate_remote, [rate(Sink, RateCount) || _ <- lists:seq(1, RateRuns)]),
    report(spawn_remote, [spawn_remote(Other, SpawnCount) || _ <- lists:seq(1, RateRuns)]),
    report(rtt_local, rtt(LEcho, Small, Iters, Runs, Warmup)),
    report(rate_local, [rate(LSink, RateCount) || _ <- lists:seq(1, RateRuns)]),
    report(spawn_local, [spawn_local(LocalSpawn) || _ <- lists:seq(1, RateRuns)]),
    [P ! stop || P <- [Echo, Sink, LEcho, LSink]],
    rpc:cast(Other, erlang, halt, [0]),
    erlang:halt(0).

connect(Other, Deadline) ->
    case net_kernel:connect_node(Other) of
        true -> ok;
        _ ->
            case erlang:monotonic_time(millisecond) > Deadline of
                true -> io:format("error cannot connect to ~s~n", [Other]), erlang:halt(2);
                false -> timer:sleep(20), connect(Other, Deadline)
            end
    end.

report(Name, Values) ->
    io:format("result ~s~s~n", [Name, [io_lib:format(" ~w", [V]) || V <- Values]]).

rtt(Echo, Payload, Iters, Runs, Warmup) ->
    ping(Echo, {self(), Payload}, Warmup),
    [begin
         T0 = now_s(),
         ping(Echo, {self(), Payload}, Iters),
         (now_s() - T0) / Iters
     end || _ <- lists:seq(1, Runs)].

ping(_, _, 0) -> ok;
ping(Echo, Msg, N) ->
    Echo ! Msg,
    receive _ -> ok end,
    ping(Echo, Msg, N - 1).

rate(Sink, N) ->
    T0 = now_s(),
    Sink ! {count, N, self()},
    send_n(Sink, N),
    receive done -> ok end,
    N / (now_s() - T0).

send_n(_, 0) -> ok;
send_n(Sink, N) -> Sink ! N, send_n(Sink, N - 1).

%% Sequential remote spawns, each waiting for the new process's pid (as hpcproc's spawn).
spawn_remote(Node, K) ->
    T0 = now_s(),
    spawn_remote_n(Node, K),
    K / (now_s() - T0).

spawn_remote_n(_, 0) -> ok;
spawn_remote_n(Node, K) ->
    Ref = erlang:spawn_request(Node, peer_bench, noop, [], []),
    receive {spawn_reply, Ref, ok, _Pid} -> ok end,
    spawn_remote_n(Node, K - 1).

%% K processes that end at once, until all have ended.
spawn_local(K) ->
    T0 = now_s(),
    [spawn_monitor(fun noop/0) || _ <- lists:seq(1, K)],
    await_down(K),
    K / (now_s() - T0).

await_down(0) -> ok;
await_down(K) -> receive {'DOWN', _, process, _, _} -> await_down(K - 1) end.
